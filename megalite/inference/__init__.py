"""Inference: KV cache, sampling and the decoding loop behind ``megalite generate``."""
from megalite.inference.generation import (GenerationOutput, full_vocab_logits,
                                           generate_seq2seq_tokens, generate_tokens)
from megalite.inference.kv_cache import KVCache, LayerKVCache
from megalite.inference.sampling import SamplingConfig, filter_logits, sample_next

__all__ = ["KVCache", "LayerKVCache", "SamplingConfig", "filter_logits", "sample_next",
           "GenerationOutput", "generate_tokens", "generate_seq2seq_tokens",
           "full_vocab_logits"]
