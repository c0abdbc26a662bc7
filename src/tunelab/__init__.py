"""tunelab: fine-tune open language models on your own data."""

__version__ = "0.1.0"
