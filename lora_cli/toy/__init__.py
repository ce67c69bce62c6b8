"""Small procedural data and tiny models: the project's own material for quick runs and tests."""
