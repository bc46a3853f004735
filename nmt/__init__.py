"""nmt: a Transformer translation system (train -> export -> serve)."""

__version__ = "0.1.0"
