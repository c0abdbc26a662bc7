"""Data: rows -> messages -> tokens and labels. Needs a tokenizer, never a model."""
