"""The GPT model family (classic GPT-2 and LLaMA recipes), presets and FLOPs accounting.

``GPTModel`` is imported lazily so that configs, presets and FLOPs can be used without pulling
in the parallel layers.
"""
from megalite.model.config import TransformerConfig, padded_vocab_size
from megalite.model.flops import flops_per_iteration
from megalite.model.presets import PRESETS, get_preset

__all__ = ["TransformerConfig", "GPTModel", "PRESETS", "flops_per_iteration", "get_preset",
           "padded_vocab_size"]


def __getattr__(name):
    if name == "GPTModel":
        from megalite.model.gpt import GPTModel
        return GPTModel
    raise AttributeError(name)
