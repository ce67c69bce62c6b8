"""The training loop and its parts: data, caches, losses, optimizers, checkpoints, callbacks."""
