"""--train-data-path / --valid-data-path / --test-data-path against megatron-core 0.16.1's
builder with ``blend_per_split`` (what Megatron-LM builds from those flags): every split's
dataset indices and every sample's tokens equal, no tolerance. Two token files made by megalite
from the built-in corpus (two tokenizers); one-process gloo group, as megatron-core's builder
reads torch.distributed."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch.distributed as dist

from megalite.config import DataConfig
from megalite.data.per_split import build_run_datasets

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_dataset import BlendedDataset as MegatronBlended
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPT
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MegatronConfig

SEQ = 64


class _NoTokenizer:
    """The data is already tokenized: no vocabulary, an identity for megatron-core's cache."""

    vocab_size = None
    unique_identifiers = {"class": "none"}


@pytest.fixture(scope="module", autouse=True)
def one_process_group(tmp_path_factory):
    path = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _tokens(dataset, i):
    """Sample i of a megatron-core GPT or blended dataset, before its loss masking."""
    if isinstance(dataset, MegatronBlended):
        k = int(dataset.dataset_index[i])
        return _tokens(dataset.datasets[k], int(dataset.dataset_sample_index[i]))
    return dataset._query_document_sample_shuffle_indices(i)[0]


def _megatron(blends, sizes, seed, cache):
    config = MegatronConfig(
        random_seed=seed, sequence_length=SEQ, blend_per_split=blends, split=None,
        path_to_cache=str(cache), tokenizer=_NoTokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(MegatronGPT, list(sizes), lambda: True,
                                             config).build()


@pytest.mark.parametrize("case", ["one-file-each", "weighted-blend"])
def test_per_split_paths_equal_megatrons_blend_per_split(corpus_token_dataset, wide_dataset,
                                                        tmp_path, case):
    a, b = corpus_token_dataset, wide_dataset
    if case == "one-file-each":
        paths = [[a], [b], None]
        blends = [([a], None), ([b], None), None]
    else:
        paths = [["0.7", a, "0.3", b], [a], [b]]
        blends = [([a, b], [0.7, 0.3]), ([a], None), ([b], None)]
    sizes, seed = (900, 120, 40), 4321
    data = DataConfig(train_data_path=paths[0], valid_data_path=paths[1],
                      test_data_path=paths[2], data_cache_path=str(tmp_path / "ours"),
                      blend_rule="megatron")
    ours = build_run_datasets(data, sizes, SEQ, seed)
    theirs = _megatron(blends, sizes, seed, tmp_path / "megatron")
    for k in range(3):
        if paths[k] is None:
            assert ours[k] is None and theirs[k] is None
            continue
        assert len(ours[k]) == len(theirs[k])
        if isinstance(theirs[k], MegatronBlended):
            assert np.array_equal(ours[k].dataset_index, theirs[k].dataset_index)
            assert np.array_equal(ours[k].dataset_sample_index, theirs[k].dataset_sample_index)
        else:
            for name in ("document_index", "sample_index", "shuffle_index"):
                assert np.array_equal(getattr(ours[k], name), getattr(theirs[k], name)), name
        for i in range(len(ours[k])):
            assert np.array_equal(ours[k][i], _tokens(theirs[k], i)), (k, i)
