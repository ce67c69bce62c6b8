"""lora-cli: fine-tune diffusion models with LoRA-family adapters from a YAML preset."""

__version__ = "0.1.0"
