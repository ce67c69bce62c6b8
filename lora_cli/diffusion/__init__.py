"""Diffusion training math below the architectures: noise objectives, losses, sample geometry."""
