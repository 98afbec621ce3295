"""Shared, session-scoped test data, all made locally (no downloads), each in its own tmp dir.

- ``corpus_jsonl``: the built-in corpus (pydoc topics + stdlib docstrings, ~2 MB, ~3k documents)
  as jsonl ``{"text": ...}``; ``corpus_texts``: its documents as a list of str.
- ``sp_model``: a SentencePiece BPE ``.model`` (vocab 1000) trained on it with
  ``megalite train-tokenizer --character-coverage 1.0``; eos ``</s>`` = 2; no ``<unk>`` on the corpus.
- ``wordpiece_vocab``: a BERT ``vocab.txt`` (vocab 2000, lower-cased; [PAD] [UNK] [CLS] [SEP]
  [MASK] = 0-4) trained with ``megalite train-tokenizer --model-type wordpiece``.
- ``hf_tokenizer_json``: a byte-level BPE ``tokenizer.json`` (vocab 2000) with ``<|endoftext|>``.
- ``corpus_token_dataset``: prefix of the corpus tokenised with ``sp_model`` (``--append-eod``),
  i.e. ``PREFIX.bin``/``PREFIX.idx``, uint16.
- ``wordpiece_sentence_dataset``: the corpus split into sentences and tokenised with
  ``wordpiece_vocab`` (BERT training data).
- ``wide_dataset``: the corpus tokenised with ``hf_tokenizer_json`` (ids up to 1,999: more than
  ``sp_model``'s 1,000, for the vocabulary-mismatch tests).
- ``t5_spiece_model``: a SentencePiece unigram ``.model`` (vocab 800) with T5's ids (pad 0,
  eos ``</s>`` 1, unk 2, no bos), as Hugging Face T5 directories hold it (``spiece.model``).
- ``one_process_group`` (per module): a one-process gloo group, for megatron-core's datasets
  (they read ``torch.distributed``).

Each is built once per test session (a few seconds in all).
"""
from __future__ import annotations

import json

import pytest

SP_VOCAB_SIZE = 1000
WORDPIECE_VOCAB_SIZE = 2000
HF_BPE_VOCAB_SIZE = 2000


def read_jsonl_texts(path, key: str = "text") -> list[str]:
    """The ``key`` values of a jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f if line.strip()]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> str:
    from megalite.data.builtin_corpus import write_builtin_corpus

    path = str(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
    write_builtin_corpus(path)
    return path


@pytest.fixture(scope="session")
def corpus_texts(corpus_jsonl) -> list[str]:
    """The documents of ``corpus_jsonl``, in file order."""
    return read_jsonl_texts(corpus_jsonl)


@pytest.fixture(scope="session")
def sp_model(corpus_jsonl, tmp_path_factory) -> str:
    from megalite.dataprep import train_tokenizer

    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    rc = train_tokenizer.main(["--input", corpus_jsonl, "--output-prefix", prefix,
                               "--vocab-size", str(SP_VOCAB_SIZE), "--model-type", "bpe",
                               "--character-coverage", "1.0",
                               "--num-threads", "2"])
    assert rc == 0
    return prefix + ".model"


@pytest.fixture(scope="session")
def wordpiece_vocab(corpus_jsonl, tmp_path_factory) -> str:
    from megalite.dataprep import train_tokenizer

    prefix = str(tmp_path_factory.mktemp("wordpiece") / "wp")
    assert train_tokenizer.main(["--input", corpus_jsonl, "--output-prefix", prefix,
                                 "--model-type", "wordpiece",
                                 "--vocab-size", str(WORDPIECE_VOCAB_SIZE)]) == 0
    return prefix + ".vocab.txt"


@pytest.fixture(scope="session")
def hf_tokenizer_json(corpus_jsonl, tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=HF_BPE_VOCAB_SIZE, show_progress=False,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(read_jsonl_texts(corpus_jsonl), trainer=trainer)
    path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def t5_spiece_model(corpus_texts, tmp_path_factory) -> str:
    import sentencepiece as spm

    prefix = str(tmp_path_factory.mktemp("spiece") / "spiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_texts), model_prefix=prefix, vocab_size=800,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=2, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def corpus_token_dataset(corpus_jsonl, sp_model, tmp_path_factory) -> str:
    from megalite.dataprep import preprocess_data

    prefix = str(tmp_path_factory.mktemp("tokens") / "corpus")
    rc = preprocess_data.main(["--input", corpus_jsonl, "--output-prefix", prefix,
                               "--tokenizer-type", "SentencePieceTokenizer",
                               "--tokenizer-model", sp_model, "--append-eod", "--workers", "1",
                               "--log-interval", "1000000"])
    assert rc == 0
    return prefix + "_text_document"


def _preprocess(corpus_jsonl: str, directory, *flags: str) -> str:
    """``megalite preprocess`` of the corpus into ``directory`` with the tokenizer ``flags``;
    returns the output prefix (``.../corpus``)."""
    from megalite.dataprep import preprocess_data

    prefix = str(directory / "corpus")
    assert preprocess_data.main(["--input", corpus_jsonl, "--output-prefix", prefix, *flags,
                                 "--workers", "1", "--log-interval", "1000000"]) == 0
    return prefix


@pytest.fixture(scope="session")
def wordpiece_sentence_dataset(corpus_jsonl, wordpiece_vocab, tmp_path_factory) -> str:
    """The corpus split into sentences (``--split-sentences``) and tokenized with
    ``wordpiece_vocab`` (BertWordPieceLowerCase): BERT/T5 training data."""
    return _preprocess(corpus_jsonl, tmp_path_factory.mktemp("wordpiece_sentences"),
                       "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                       wordpiece_vocab, "--split-sentences") + "_text_sentence"


@pytest.fixture(scope="session")
def wide_dataset(corpus_jsonl, hf_tokenizer_json, tmp_path_factory) -> str:
    """The corpus tokenized with the 2,000-entry byte-level BPE (ids up to 1,999)."""
    return _preprocess(corpus_jsonl, tmp_path_factory.mktemp("wide"), "--tokenizer-type",
                       "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_json,
                       "--append-eod") + "_text_document"


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    import torch.distributed as dist

    path = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
