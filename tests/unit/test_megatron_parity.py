"""megalite's GPT and blended datasets against megatron-core's, on real text.

megatron-core 0.16.1 (installed by ``make install``) is the reference: its
``BlendedMegatronDatasetBuilder`` builds the train/valid/test datasets from the same token files
(preprocessed by megalite) with the same seed, split, sequence length, sample counts,
``add_extra_token_to_sequence`` and ``drop_last_partial_validation_sequence``. Everything must be
equal: the document, sample and shuffle indices of every GPT dataset, and for
``blend_rule="megatron"`` the blend's dataset index, dataset sample index, size and the sample
count it asks of each component; and every sample's tokens. No tolerance anywhere.

Megatron's builder reads ``torch.distributed`` for its blended datasets, so the module runs in a
one-process gloo group (megalite's cache builder then takes its distributed path, with one rank).
"""
import warnings

import numpy as np
import pytest

from megalite.data.blended import BlendedDataset, build_train_valid_test_datasets
from megalite.data.gpt_dataset import GPTDataset
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder

with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_dataset import BlendedDataset as MegatronBlended
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPT
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MegatronConfig

SEQ = 128


class _NoTokenizer:
    """What megatron-core's config needs of a tokenizer when the data is already tokenized:
    no vocabulary size (the token dtype is read from the file) and an identity for its cache
    key; no pad id, so partial samples are padded with its default, -1 (megalite's too)."""

    vocab_size = None
    unique_identifiers = {"class": "none"}


pytestmark = pytest.mark.usefixtures("one_process_group")


def megatron_datasets(prefixes, weights, split, sizes, seed, cache, extra=True, drop_last=True):
    """megatron-core's train/valid/test datasets (a size None: one epoch, as Megatron allows)."""
    config = MegatronConfig(
        random_seed=seed, sequence_length=SEQ, blend=(list(prefixes), weights), split=split,
        path_to_cache=str(cache), tokenizer=_NoTokenizer(), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, add_extra_token_to_sequence=extra,
        drop_last_partial_validation_sequence=drop_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(MegatronGPT, list(sizes), lambda: True, config).build()


def megalite_datasets(prefixes, weights, split, sizes, seed, cache, **kwargs):
    data_path = list(prefixes) if weights is None else [
        word for w, p in zip(weights, prefixes) for word in (str(w), p)]
    return build_train_valid_test_datasets(data_path, split, [n or 0 for n in sizes], SEQ, seed,
                                           cache_dir=str(cache), **kwargs)


def megatron_tokens(dataset, i):
    """The tokens of Megatron's sample i before its loss masking (pads included)."""
    if isinstance(dataset, MegatronBlended):
        k = int(dataset.dataset_index[i])
        return megatron_tokens(dataset.datasets[k], int(dataset.dataset_sample_index[i]))
    return dataset._query_document_sample_shuffle_indices(i)[0]


def assert_same_gpt(ours, theirs):
    assert isinstance(ours, GPTDataset) and isinstance(theirs, MegatronGPT)
    assert ours.sequence_range == (int(theirs.indices[0]), int(theirs.indices[-1]) + 1)
    assert ours.num_samples == theirs.num_samples
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name
    assert len(ours) == len(theirs)


def assert_same_samples(ours, theirs):
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        assert np.array_equal(ours[i], megatron_tokens(theirs, i)), i


def assert_same_blend(ours, theirs):
    assert isinstance(ours, BlendedDataset) and isinstance(theirs, MegatronBlended)
    assert len(ours) == len(theirs) == theirs.size
    assert np.array_equal(ours.dataset_index, theirs.dataset_index)
    assert np.array_equal(ours.dataset_sample_index, theirs.dataset_sample_index)
    assert ours.weights.tolist() == list(theirs.weights)
    # The sample count asked of each component (Megatron's 0.5% surplus) and its indices.
    assert [d.num_samples for d in ours.datasets] == [d.num_samples for d in theirs.datasets]
    for a, b in zip(ours.datasets, theirs.datasets):
        assert_same_gpt(a, b)


def assert_same_splits(ours, theirs, expect_empty=()):
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a is None:  # megalite builds nothing for zero samples; Megatron an empty epoch
            assert b is None or k in expect_empty and len(b) == 0
            continue
        if isinstance(b, MegatronBlended):
            assert_same_blend(a, b)
        else:
            assert_same_gpt(a, b)
        assert_same_samples(a, b)


# ---- GPT datasets over one file ------------------------------------------------------------

def epoch_case_sizes(prefix, split, case):
    """Train sample counts for one epoch, several epochs with one shuffle, and a separately
    shuffled final epoch, from the train split's tokens."""
    lengths = IndexedDataset(prefix).sequence_lengths
    fraction = [float(x) for x in split.split(",")]
    hi = int(round(fraction[0] / sum(fraction) * len(lengths)))
    per_epoch = (int(np.asarray(lengths[:hi]).sum(dtype=np.int64)) - 1) // SEQ
    return {"one": per_epoch // 2, "several": 2 * per_epoch + per_epoch * 9 // 10,
            "separate": 2 * per_epoch + 3}[case]


@pytest.mark.parametrize("seed,split,case", [
    (1234, "969,30,1", "one"), (0, "969,30,1", "several"), (2**32 - 1, "90,8,2", "separate"),
    (7, "0.7,0.2,0.1", "one"), (31337, "98,2,0", "separate"), (5, "1", "several")])
def test_gpt_datasets_equal_megatrons(corpus_token_dataset, tmp_path, seed, split, case):
    n = epoch_case_sizes(corpus_token_dataset, split, case)
    sizes = (n, 300, 40)
    ours = megalite_datasets([corpus_token_dataset], None, split, sizes, seed, tmp_path / "ours")
    theirs = megatron_datasets([corpus_token_dataset], None, split, sizes, seed,
                               tmp_path / "megatron")
    assert_same_splits(ours, theirs)
    train = ours[0]
    assert train.num_epochs == {"one": 1, "several": 3, "separate": 3}[case]
    assert train.separate_final_epoch == (case == "separate")


@pytest.mark.parametrize("extra,drop_last", [(False, True), (True, False), (False, False)])
def test_extra_token_and_partial_validation_sample(corpus_token_dataset, tmp_path, extra,
                                                   drop_last):
    sizes = (2000, 500, 30)
    ours = megalite_datasets([corpus_token_dataset], None, "90,8,2", sizes, 11, tmp_path / "o",
                             add_extra_token_to_sequence=extra,
                             drop_last_partial_validation_sequence=drop_last)
    theirs = megatron_datasets([corpus_token_dataset], None, "90,8,2", sizes, 11, tmp_path / "m",
                               extra=extra, drop_last=drop_last)
    assert_same_splits(ours, theirs)
    assert ours[0][0].shape == (SEQ + extra,)


def write_subset(prefix, source, documents, sentence_rng=None):
    """The first ``documents`` documents of ``source``, each optionally cut into sentences of
    random lengths (several sequences per document, like a sentence-split file)."""
    src = IndexedDataset(source)
    with IndexedDatasetBuilder(prefix, src.dtype) as builder:
        for d in range(documents):
            tokens = np.asarray(src.document(d))
            lengths = None
            if sentence_rng is not None:
                cuts = np.sort(sentence_rng.choice(np.arange(1, len(tokens)),
                                                   min(len(tokens) - 1, 3), replace=False))
                lengths = np.diff(np.concatenate([[0], cuts, [len(tokens)]])).tolist()
            builder.add_document(tokens, lengths)
        builder.finalize()
    return prefix


def test_split_tie_rounds_half_to_even(corpus_token_dataset, tmp_path):
    # 500 sequences at 969,30,1: 484.5 -> 484 and 499.5 -> 500, so the test split is empty.
    prefix = write_subset(str(tmp_path / "five_hundred"), corpus_token_dataset, 500)
    ours = megalite_datasets([prefix], None, "969,30,1", (700, 90, 0), 3, tmp_path / "o")
    theirs = megatron_datasets([prefix], None, "969,30,1", (700, 90, None), 3, tmp_path / "m")
    assert ours[0].sequence_range == (0, 484) and ours[1].sequence_range == (484, 500)
    assert_same_splits(ours, theirs, expect_empty=(2,))


def test_sentence_split_file(corpus_token_dataset, tmp_path):
    # Several sequences per document: the split and the index are over sequences, as Megatron's.
    prefix = write_subset(str(tmp_path / "sentences"), corpus_token_dataset, 3084,
                          np.random.default_rng(0))
    indexed = IndexedDataset(prefix)
    assert len(indexed.sequence_lengths) > 3 * indexed.num_documents - 10
    ours = megalite_datasets([prefix], None, "90,8,2", (6000, 600, 80), 21, tmp_path / "o")
    theirs = megatron_datasets([prefix], None, "90,8,2", (6000, 600, 80), 21, tmp_path / "m")
    assert_same_splits(ours, theirs)


# ---- blends ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_files(corpus_token_dataset, wide_dataset, tmp_path_factory):
    """Real text three ways: the SentencePiece corpus, the same corpus in byte-level BPE, and a
    sentence-split copy of the first 1500 documents."""
    sentences = write_subset(str(tmp_path_factory.mktemp("blend") / "sentences"),
                             corpus_token_dataset, 1500, np.random.default_rng(1))
    return [corpus_token_dataset, wide_dataset, sentences]


@pytest.mark.parametrize("weights,sizes,seed", [
    ([0.3, 0.7, None], (3000, 300, 40), 1234),
    ([0.5, 0.25, 0.25], (4999, 333, 41), 99),
    ([8, 8, 1.0625], (2500, 250, 25), 0),
    (None, (3000, 300, 40), 1234)])
def test_megatron_blend_rule_equals_megatrons(three_files, tmp_path, weights, sizes, seed):
    if weights is not None and weights[-1] is None:
        prefixes, weights = three_files[:2], weights[:2]
    else:
        prefixes = three_files
    ours = megalite_datasets(prefixes, weights, "90,8,2", sizes, seed, tmp_path / "o",
                             blend_rule="megatron")
    theirs = megatron_datasets(prefixes, weights, "90,8,2", sizes, seed, tmp_path / "m")
    assert_same_splits(ours, theirs)
    assert all(isinstance(d, BlendedDataset) and d.blend_rule == "megatron" for d in ours)


def test_megatron_blend_of_one_weighted_file(three_files, tmp_path):
    ours = megalite_datasets(three_files[2:], [1.0], "90,8,2", (1000, 100, 20), 5, tmp_path / "o",
                             blend_rule="megatron")
    theirs = megatron_datasets(three_files[2:], [1.0], "90,8,2", (1000, 100, 20), 5,
                               tmp_path / "m")
    assert_same_splits(ours, theirs)


def test_default_rule_keeps_its_bound_on_the_same_blend(three_files, tmp_path):
    # Same files and weights as a Megatron case above: the default blend has exactly n samples,
    # each dataset's count within one of its share after every step, and each component is
    # still Megatron's GPT dataset for the sample count it is asked for.
    weights = np.array([8, 8, 1.0625]) / 17.0625
    train, _, _ = megalite_datasets(three_files, [8, 8, 1.0625], "90,8,2", (2500, 0, 0), 0,
                                    tmp_path / "o")
    assert len(train) == 2500 and train.blend_rule == "megalite"
    counts = np.cumsum(np.eye(3)[train.dataset_index], axis=0)
    ideal = np.arange(1, 2501)[:, None] * weights[None, :]
    # Tijdeman's bound 1 - 1/(2K-2) = 0.75; 1e-9: w * t is itself rounded.
    assert np.abs(counts - ideal).max() <= 0.75 + 1e-9
    sizes = [d.num_samples for d in train.datasets]
    theirs = [megatron_datasets([p], None, "90,8,2", (n, None, None), 0, tmp_path / f"m{k}")[0]
              for k, (p, n) in enumerate(zip(three_files, sizes))]
    for a, b in zip(train.datasets, theirs):
        assert_same_gpt(a, b)


def test_blend_rule_flag_reaches_the_trainer(three_files, tmp_path):
    """`megalite train --blend-rule megatron` trains on megatron-core's blend (the flag goes
    through the config and the trainer to the builder); the default flag on the default rule."""
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import Trainer

    a, b = three_files[:2]
    argv = ["--model-preset", "tiny", "--vocab-size", "2000", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--data-path", "0.3", a, "0.7", b,
            "--split", "90,8,2", "--train-iters", "10", "--micro-batch-size", "8",
            "--eval-iters", "0", "--seed", "7", "--data-cache-path", str(tmp_path / "o")]
    trainer = Trainer(parse_train_args(argv + ["--blend-rule", "megatron"]))
    theirs = megatron_datasets([a, b], [0.3, 0.7], "90,8,2", (80, 0, 0), 7, tmp_path / "m")
    assert_same_blend(trainer.train_data.dataset, theirs[0])
    assert Trainer(parse_train_args(argv)).train_data.dataset.blend_rule == "megalite"
