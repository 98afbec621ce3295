"""Which Hugging Face architecture a megalite model is: the recipe check shared by the
converters and the commands."""
from __future__ import annotations

from megalite.errors import MegaliteError
from megalite.model.config import TransformerConfig


def architecture_of(config: TransformerConfig) -> str:
    """"moe" for the LLaMA recipe with expert layers, "llama" for the LLaMA recipe (RMSNorm, rope, swiglu, no bias, untied), "gpt2" for the
    classic recipe with learned positions, LayerNorm, GELU, bias and tied embeddings.

    Raises MegaliteError for mixes no Hugging Face architecture represents exactly.
    """
    c = config
    if c.num_experts and (c.normalization, c.position_embedding_type, c.activation) == (
            "RMSNorm", "rope", "swiglu"):
        return "moe"        # Mixtral / Qwen2-MoE / Qwen3-MoE (megalite.convert.hf_moe)
    if (c.normalization == "RMSNorm" and c.position_embedding_type == "rope"
            and c.activation == "swiglu"):
        return "llama"
    if (c.normalization == "LayerNorm" and c.position_embedding_type == "learned_absolute"
            and c.activation in ("gelu", "gelu_tanh") and c.add_bias_linear and c.tied_embeddings
            and c.query_groups == c.num_attention_heads and not c.qk_layernorm):
        return "gpt2"
    raise MegaliteError("this model config has no exact Hugging Face counterpart (LLaMA needs "
                        "RMSNorm+rope+swiglu; GPT-2 needs LayerNorm+learned positions+gelu+"
                        "bias+tied embeddings+no GQA or query/key norms)")
