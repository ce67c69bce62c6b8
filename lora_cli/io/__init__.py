"""File formats: atomic writes, safetensors access, adapter key formats."""
