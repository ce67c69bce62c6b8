"""The adapter toolbox behind lora-merge, lora-convert, lora-info, lora-extract and lora-resize."""
