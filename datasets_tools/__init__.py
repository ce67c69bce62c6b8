"""Dataset scanning and validation, shared by `lora-train` and the dataset checker."""
