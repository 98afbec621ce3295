"""megalite: Megatron-style distributed pretraining for Transformer language models."""

__version__ = "0.1.0"
