"""A training run's (train, valid, test) GPT datasets from its data settings: ``--data-path``
split by ``--split``, or each split from its own files (``--train-data-path``,
``--valid-data-path``, ``--test-data-path``), used whole.

A split with its own files is built as megatron-core's builder builds a ``blend_per_split``:
the split takes the whole of each file (as ``--split`` 1,0,0 / 0,1,0 / 0,0,1 would give it),
keeps its name (so the validation split keeps Megatron-LM's partial last sample), and blends
its files by the same rule and weights as ``--data-path`` does. A split without files, or asked
for no samples, is None (no evaluation on it).
"""
from __future__ import annotations

import functools

from megalite.data.bert_dataset import MockBERTDataset, build_bert_datasets
from megalite.data.blended import build_train_valid_test_datasets
from megalite.data.gpt_dataset import MockGPTDataset
from megalite.data.masked_dataset import masked_lm_vocab
from megalite.data.t5_dataset import MockT5Dataset, build_t5_datasets
from megalite.data.tokenizers import build_tokenizer
from megalite.errors import MegaliteError

__all__ = ["build_run_datasets", "gpt_datasets", "bert_datasets", "t5_datasets",
           "run_masked_lm_vocab"]


def build_run_datasets(data, num_samples: tuple[int, int, int], seq_length: int, seed: int,
                       vocab_size: int | None = None,
                       builder=build_train_valid_test_datasets) -> tuple:
    """(train, valid, test) datasets of ``data`` (a :class:`~megalite.config.DataConfig`),
    split k serving ``num_samples[k]`` samples of ``seq_length`` (+ 1 for GPT) tokens.

    ``builder(paths, split, num_samples, seq_length, seed, cache_dir=, vocab_size=,
    blend_rule=)`` builds one blend's three splits: the GPT builder by default, a family's
    own (BERT, T5) otherwise."""
    common = dict(cache_dir=data.data_cache_path, vocab_size=vocab_size,
                  blend_rule=data.blend_rule)
    if data.data_path:
        return builder(data.data_path, data.split, num_samples, seq_length, seed, **common)
    out = []
    for k, paths in enumerate(data.per_split_paths()):
        if not paths or not num_samples[k]:
            out.append(None)
            continue
        split = ",".join("1" if j == k else "0" for j in range(3))
        sizes = tuple(num_samples[k] if j == k else 0 for j in range(3))
        out.append(builder(paths, split, sizes, seq_length, seed, **common)[k])
    return tuple(out)


def gpt_datasets(config, num_samples: tuple[int, int, int], seq_length: int,
                 seed: int) -> tuple:
    """GPT's (train, valid, test) datasets of a run (``config``: its TrainConfig): random
    tokens with ``--mock-data`` (split k seeded ``seed + k``), else the token files."""
    vocab_size = config.model.vocab_size
    if config.data.mock_data:
        return tuple(MockGPTDataset(vocab_size, seq_length, n, seed + k) if n else None
                     for k, n in enumerate(num_samples))
    return build_run_datasets(config.data, num_samples, seq_length, seed, vocab_size=vocab_size)


def run_masked_lm_vocab(data, vocab_extra_ids: int = 0):
    """The BERT/T5 data vocabulary (:func:`~megalite.data.masked_dataset.masked_lm_vocab`) of
    a run's WordPiece tokenizer (``data``: its DataConfig)."""
    if data.tokenizer_type is None:
        raise MegaliteError("BERT and T5 data need a WordPiece vocabulary: give --tokenizer-type "
                            "BertWordPieceLowerCase (or BertWordPieceCase) --vocab-file vocab.txt")
    return masked_lm_vocab(build_tokenizer(data.tokenizer_type, data.tokenizer_model,
                                           data.vocab_file, data.merge_file), vocab_extra_ids)


def bert_datasets(config, num_samples: tuple[int, int, int], seq_length: int,
                  seed: int) -> tuple:
    """BERT's (train, valid, test) datasets of a run (``config``: its TrainConfig): random
    samples with ``--mock-data`` (:class:`~megalite.data.bert_dataset.MockBERTDataset`), else
    from sentence-split WordPiece token files, sampled as Megatron-LM's ``pretrain_bert.py`` asks
    megatron-core: whole-word masking of ``--mask-prob`` of the tokens in n-grams of up to 3
    words with 1/n lengths, ``--short-seq-prob``, sentence pairs for the binary head unless
    ``--bert-no-binary-head``."""
    data = config.data
    if data.mock_data:
        return tuple(MockBERTDataset(config.model.vocab_size, seq_length, n, seed + k,
                                     data.mask_prob) if n else None
                     for k, n in enumerate(num_samples))
    builder = functools.partial(
        build_bert_datasets, vocab=run_masked_lm_vocab(data),
        classification_head=config.model.bert_binary_head, masking_probability=data.mask_prob,
        short_sequence_probability=data.short_seq_prob, masking_max_ngram=3,
        masking_do_full_word=True, masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=False)
    return build_run_datasets(data, num_samples, seq_length, seed,
                              vocab_size=config.model.vocab_size, builder=builder)


def t5_datasets(config, num_samples: tuple[int, int, int], seq_length: int,
                seed: int) -> tuple:
    """T5's (train, valid, test) datasets of a run (``config``: its TrainConfig), samples of
    ``seq_length`` encoder and ``config.model.decoder_seq_length`` decoder tokens: random ones
    with ``--mock-data`` (:class:`~megalite.data.t5_dataset.MockT5Dataset`), else span
    corruption of sentence-split WordPiece token files with ``--vocab-extra-ids`` sentinels,
    sampled as Megatron-LM's ``pretrain_t5.py`` asks megatron-core (``--mask-prob`` of the
    tokens in whole-word n-grams of up to 10 words with geometric lengths,
    ``--short-seq-prob``)."""
    data, decoder = config.data, config.model.decoder_seq_length
    if data.mock_data:
        return tuple(MockT5Dataset(config.model.vocab_size, seq_length, decoder, n, seed + k,
                                   data.mask_prob) if n else None
                     for k, n in enumerate(num_samples))
    builder = functools.partial(
        build_t5_datasets, vocab=run_masked_lm_vocab(data, data.vocab_extra_ids),
        decoder_seq_length=decoder, masking_probability=data.mask_prob,
        short_sequence_probability=data.short_seq_prob, masking_max_ngram=10,
        masking_do_full_word=True, masking_use_longer_ngrams=False,
        masking_use_geometric_distribution=True)
    return build_run_datasets(data, num_samples, seq_length, seed,
                              vocab_size=config.model.vocab_size, builder=builder)
