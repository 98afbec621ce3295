"""Shared by the Hugging Face parity and conversion tests: random Hugging Face weights whose
logits are O(1), so a logit comparison at 1e-4 is sensitive (HF's tiny-std init gives near-zero
logits, which would hide a wrong mapping), the T5 models of those tests and the small MoE
models (plus dense Qwen3) of the MoE conversion and generation tests."""
import torch

T5_VERSIONS = {
    # v1.0: ReLU, output layer = the embedding, decoder output scaled by h^-0.5; 2 + 3 layers,
    # d_kv x heads (64) = d_model, few buckets so that distances past max_distance occur.
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=3,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20),
    # v1.1: gated GELU, untied and unscaled; d_kv x heads (48) != d_model, as in T5 v1.1 small.
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12),
}


@torch.no_grad()
def scale_up_(model: torch.nn.Module) -> torch.nn.Module:
    """Redraw ``model``'s parameters in place: matrices N(0, 0.2), norm weights U(0.5, 1.5),
    everything else N(0, 0.1) (torch's global generator: seed it first)."""
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.2)
        elif "norm" in name.lower() or "ln_" in name or ".ln." in name:  # + BERT's LayerNorm, ln
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0.0, 0.1)
    return model


def hf_t5_model(version: str, seed: int = 0, vocab_size: int = 300, **changes):
    """A random T5ForConditionalGeneration of ``T5_VERSIONS[version]``, eager attention:
    matrices N(0, 0.1) (T5 does not scale its attention scores by 1/sqrt(d), so GPT's 0.2
    would make them and their float32 rounding d times larger; see test_hf_t5.py), norms
    U(0.5, 1.5), the shared embedding N(0, 1) as T5 initializes it. ``changes``: T5Config
    fields."""
    import transformers
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
              dropout_rate=0.0, decoder_start_token_id=0)
    kw.update(T5_VERSIONS[version], **changes)
    hf_cfg = transformers.T5Config(**kw)
    hf_cfg._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    if version == "v1.1":   # transformers 5 builds lm_head tied; v1.1 checkpoints are not
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    scale_up_(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("shared", "lm_head")) \
                    and "relative_attention_bias" not in name:
                p.mul_(0.5)
        model.shared.weight.normal_(0.0, 1.0)     # T5's own embedding scale
    return model


def megalite_config_of(hf):
    """The megalite config of an HF T5 model (tied as its tensors are)."""
    from megalite.convert import config_from_hf
    state = hf.state_dict()
    return config_from_hf(hf.config, set(state), state.__getitem__)


def t5_batch(seed: int = 1, vocab_size: int = 300):
    """Source [2, 30] and decoder [2, 25] ids, each with one padded row, and their masks."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(0, vocab_size, (2, 30), generator=g)
    dec = torch.randint(0, vocab_size, (2, 25), generator=g)
    enc_mask = torch.ones(2, 30, dtype=torch.long)
    enc_mask[1, 20:] = 0
    dec_mask = torch.ones(2, 25, dtype=torch.long)
    dec_mask[0, 18:] = 0
    return enc, dec, enc_mask, dec_mask


def write_hf_t5_dir(directory, version: str, spiece_model: str, seed: int = 0) -> str:
    """An HF T5 model directory as the Hub has them: ``save_pretrained`` safetensors and config
    (vocabulary 928: the 800 pieces of ``spiece_model``, 100 sentinels, 28 unused rows, as
    T5's 32000 + 100 + 28), the tokenizer (``tokenizer.json`` with the sentinels) and
    ``spiece.model``; pad 0, eos 1, decoder start 0. As many decoder as encoder layers:
    transformers 5.25's ``generate`` sizes its decoder cache by the encoder's layer count."""
    import os
    import shutil

    import transformers
    model = hf_t5_model(version, seed, vocab_size=928, num_decoder_layers=2)
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.decoder_start_token_id = 0
    model.save_pretrained(directory)
    source = os.path.join(str(directory), "_spm")
    os.makedirs(source)
    shutil.copyfile(spiece_model, os.path.join(source, "spiece.model"))
    transformers.T5Tokenizer.from_pretrained(source, extra_ids=100).save_pretrained(directory)
    shutil.move(os.path.join(source, "spiece.model"), os.path.join(str(directory), "spiece.model"))
    os.rmdir(source)
    return str(directory)


MOE_KINDS = ["mixtral", "qwen2_moe", "qwen2_moe_norm", "qwen3_moe", "qwen3_moe_norm", "qwen3"]
"""``hf_moe_config`` kinds; ``_norm``: ``norm_topk_prob`` true (weights renormalised over the
top k), else false."""


def hf_moe_config(kind: str, vocab_size: int):
    """A small Hugging Face config of ``kind`` (:data:`MOE_KINDS`): 3 layers, h = 32, 4 heads /
    2 kv groups, untied; the Qwens' middle layer dense (``mlp_only_layers``), 6 experts top-3;
    Qwen3's head width 16 with 4 heads over h = 32 (h != heads x d, as in Qwen3's models)."""
    import transformers
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    if kind == "mixtral":
        return transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                          num_experts_per_tok=2, **common)
    if kind == "qwen3":
        return transformers.Qwen3Config(intermediate_size=40, head_dim=16, **common)
    routed = dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                  num_experts_per_tok=3, norm_topk_prob=kind.endswith("norm"),
                  mlp_only_layers=[1])
    if kind.startswith("qwen3_moe"):
        return transformers.Qwen3MoeConfig(head_dim=16, **routed, **common)
    return transformers.Qwen2MoeConfig(shared_expert_intermediate_size=36, **routed, **common)


def hf_moe_model(kind: str, path, vocab_size: int, seed: int = 7):
    """A random ``hf_moe_config`` model (eager attention, :func:`scale_up_` weights), saved
    with ``save_pretrained`` into ``path``; returned in eval mode."""
    import transformers
    torch.manual_seed(seed)
    cfg = hf_moe_config(kind, vocab_size)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    scale_up_(model)
    model.eval().save_pretrained(path)
    return model
