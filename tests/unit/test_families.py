"""The model-family registry (megalite/families.py): one entry per ``--model-type``, and the
places that ask it (chunk building, run preparation, FLOPs) refuse an unknown or unavailable
family with one line naming the flag."""
from __future__ import annotations

import pytest

from megalite.errors import ConfigError, MegaliteError
from megalite.families import FAMILIES, family_of
from megalite.model import flops_per_iteration, get_preset
from megalite.model.config import MODEL_TYPES
from megalite.training.prepare import parse_train_args


def test_one_entry_per_model_type():
    assert tuple(FAMILIES) == MODEL_TYPES
    gpt = family_of("gpt")
    assert family_of(get_preset("tiny")) is gpt          # a config: its model_type
    for field in ("model_class", "loss_class", "collate", "build_datasets",
                  "tokenizer_vocab_size", "forward_flops_per_token",
                  "activation_bytes_per_layer", "hf_converter"):
        assert getattr(gpt, field) is not None, field


def test_unknown_family_is_refused():
    with pytest.raises(MegaliteError, match="--model-type 'xlnet': unknown model family"):
        family_of("xlnet")
    with pytest.raises(MegaliteError, match="model_type must be one of"):
        get_preset("tiny").replace(model_type="xlnet")
    with pytest.raises(ConfigError, match="invalid choice: 'xlnet'"):
        parse_train_args(["--config", "tiny-gpt", "--mock-data", "--model-type", "xlnet"])


def test_gpt_flops_formula_is_not_applied_to_other_families():
    cfg = get_preset("tiny")
    assert family_of(cfg).flops_per_iteration(cfg, 3, 4) == flops_per_iteration(cfg, 3, 4)
    with pytest.raises(MegaliteError, match="GPT's formula does not fit a t5 model"):
        flops_per_iteration(cfg.replace(model_type="t5"), 3, 4)


def test_gpt_is_the_default_family():
    config = parse_train_args(["--config", "tiny-gpt", "--mock-data"])
    assert config.model.model_type == "gpt"
    assert parse_train_args(["--config", "tiny-gpt", "--mock-data", "--model-type",
                             "gpt"]).model == config.model


def test_a_family_not_available_is_refused_by_name(monkeypatch):
    # As T5 was until its model landed: every entry point names the flag and the reason.
    import dataclasses

    monkeypatch.setitem(FAMILIES, "t5", dataclasses.replace(
        FAMILIES["t5"], unavailable="T5 is not implemented yet"))
    with pytest.raises(ConfigError, match=r"--model-type t5: T5 is not implemented yet "
                                          r"\(model.model_type\)"):
        parse_train_args(["--config", "tiny-gpt", "--mock-data", "--model-type", "t5"])
    from megalite.distributed.parallel_state import ParallelState
    from megalite.parallel.context import ModelContext
    from megalite.parallel.pipeline.stages import build_model_chunks
    with pytest.raises(MegaliteError, match="--model-type t5: T5 is not implemented yet"):
        build_model_chunks(get_preset("tiny").replace(model_type="t5"),
                           ModelContext(ParallelState.single(), device="meta"))
