"""Training the bundled default model (scripts/train_tiny.py): data, tokenizer, objective, loop.

Not part of the installed `dgemma` package: run from the repository root (docs/DEFAULT_MODEL.md).
"""
