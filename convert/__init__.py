"""Conversion of Hugging Face folders and GGUF files into tmjax checkpoints (``tmjax convert``)."""
