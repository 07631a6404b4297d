"""Conversion between Hugging Face LLaMA checkpoints and our parameter tree."""
