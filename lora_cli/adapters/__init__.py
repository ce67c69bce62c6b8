"""Adapter algorithms (registry, math, peft injection) and the one owner of adapter files."""
