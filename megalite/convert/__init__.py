"""Hugging Face <-> megalite checkpoint conversion.

The package's face: :func:`to_hf` / :func:`from_hf` (whole state dicts), :func:`config_to_hf`
/ :func:`config_from_hf` (:mod:`.hf_models`), :func:`architecture_of` (:mod:`.architectures`),
and the name-map building blocks (:mod:`.mapping`). The ``megalite convert`` commands are :mod:`.cli` and
:mod:`.convert_ops`; streaming safetensors I/O is :mod:`.hf_io`, tokenizers :mod:`.hf_tokenizer`.
"""
from megalite.convert.architectures import architecture_of
from megalite.convert.hf_models import (architecture_module, config_from_hf, config_to_hf,
                                        from_hf, to_hf)
from megalite.convert.mapping import ParamMapping, from_hf_state_dict, to_hf_state_dict

__all__ = ["ParamMapping", "architecture_module", "architecture_of", "config_from_hf",
           "config_to_hf", "from_hf", "from_hf_state_dict", "to_hf", "to_hf_state_dict"]
