"""Shared by test_hf_parity.py and test_convert_cli.py: random Hugging Face weights whose logits
are O(1), so a logit comparison at 1e-4 is sensitive (HF's tiny-std init gives near-zero
logits, which would hide a wrong mapping)."""
import torch


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
