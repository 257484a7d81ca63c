"""Experiments that answer a question about the recipe with repo commands (each writes its own report)."""
