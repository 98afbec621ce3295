"""BERT/T5 datasets: vocabulary, trimming rule, cache, seeds and the errors bad input gets.

Their samples are compared with megatron-core's in test_masked_megatron_parity.py; this file
covers what that comparison cannot reach (megalite's own errors and choices).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from masked_reference import megalite_train_splits

from megalite.data.bert_dataset import build_bert_datasets, trim_counts
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.data.masked_dataset import masked_lm_vocab, random_state
from megalite.data.t5_dataset import build_t5_datasets
from megalite.data.tokenizers import build_tokenizer
from megalite.errors import MegaliteError


@pytest.fixture(scope="module")
def tokenizer(wordpiece_vocab):
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)


@pytest.fixture(scope="module")
def documents(tokenizer, corpus_texts, tmp_path_factory):
    """400 corpus documents, each cut into sentences at its periods (a real sentence-split file
    made without the splitter, to keep this module quick)."""
    prefix = str(tmp_path_factory.mktemp("docs") / "docs")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for text in corpus_texts[:400]:
            sentences = [tokenizer.encode(s) for s in text.split(". ")]
            sentences = [s for s in sentences if s]
            builder.add_document(np.concatenate(sentences), [len(s) for s in sentences])
        builder.finalize()
    return prefix


@given(st.integers(0, 300), st.integers(0, 300), st.data())
@settings(max_examples=300, deadline=None)
def test_trim_counts_equals_the_step_by_step_rule(length_a, length_b, data):
    if length_a + length_b <= 2:
        return
    excess = data.draw(st.integers(1, length_a + length_b - 2))  # the target is >= 2
    draws = np.asarray(data.draw(st.lists(st.floats(0, 0.9999), min_size=excess,
                                          max_size=excess)))
    a, b = list(range(length_a)), list(range(length_b))
    for u in draws:  # Megatron's loop, literally
        part = a if len(a) > len(b) else b
        del part[0 if u < 0.5 else -1]
    af, ab, bf, bb = trim_counts(length_a, length_b, draws)
    assert (a, b) == (list(range(af, length_a - ab)), list(range(bf, length_b - bb)))


def test_reseeded_random_state_is_a_new_one():
    rng = random_state(5)
    rng.standard_normal(), rng.geometric(0.2), rng.randint(0, 7), rng.random_sample(3)
    again, fresh = random_state(2**32 - 1), np.random.RandomState(2**32 - 1)
    assert again.standard_normal() == fresh.standard_normal()
    assert again.random_sample(5).tolist() == fresh.random_sample(5).tolist()


def test_vocab_appends_megatrons_tokens(tokenizer, wordpiece_vocab, tmp_path):
    v = masked_lm_vocab(tokenizer, 3)
    n = tokenizer.vocab_size
    assert (v.bos, v.eos, v.sentinels, v.size) == (n, n + 1, (n + 2, n + 3, n + 4), n + 5)
    words = open(wordpiece_vocab, encoding="utf-8").read().split("\n")[:n]
    assert [v.cls, v.sep, v.mask, v.pad] == [words.index(t) for t in
                                             ("[CLS]", "[SEP]", "[MASK]", "[PAD]")]
    assert v.continuation.tolist() == [w.startswith("##") for w in words] + [False] * 5
    # Tokens the vocab has keep their ids (Megatron-LM's add_token).
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words + ["[EOS]", "<extra_id_1>"]) + "\n", encoding="utf-8")
    w = masked_lm_vocab(build_tokenizer("BertWordPieceCase", vocab_file=str(path)), 2)
    assert (w.eos, w.bos, w.sentinels, w.size) == (n, n + 2, (n + 3, n + 1), n + 4)


def test_vocab_errors(tokenizer, sp_model, wordpiece_vocab, tmp_path):
    sp = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    with pytest.raises(MegaliteError, match="need a WordPiece vocabulary"):
        masked_lm_vocab(sp)
    with pytest.raises(MegaliteError, match="--vocab-extra-ids -1"):
        masked_lm_vocab(tokenizer, -1)
    words = open(wordpiece_vocab, encoding="utf-8").read().split()
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(w for w in words if w != "[MASK]") + "\n", encoding="utf-8")
    with pytest.raises(MegaliteError, match=r"vocab.txt: no \[MASK\] token"):
        masked_lm_vocab(build_tokenizer("BertWordPieceCase", vocab_file=str(path)))


def test_items_have_the_documented_shapes(tokenizer, documents, tmp_path):
    vocab = masked_lm_vocab(tokenizer, 20)
    bert, t5 = megalite_train_splits(documents, vocab, 100, 64, 1, 32, tmp_path)
    for dataset, shapes in ((bert, {"text": 64, "types": 64, "labels": 64, "loss_mask": 64,
                                    "padding_mask": 64, "is_random": None, "truncated": None}),
                            (t5, {"text_enc": 64, "text_dec": 32, "labels": 32, "loss_mask": 32,
                                  "enc_mask": 64, "dec_mask": 32, "truncated": None})):
        for i in range(len(dataset)):
            item = dataset[i]
            assert {k: (v.shape[0] if v.ndim else None) for k, v in item.items()} == shapes
            assert all(v.dtype == np.int64 for v in item.values())
    item = bert[0]
    n = int(item["padding_mask"].sum())
    assert item["text"][0] == vocab.cls and (item["labels"] >= 0).sum() == item["loss_mask"].sum()
    assert (item["text"][n:] == 0).all() and (item["types"][n:] == 0).all()


def test_index_cache_is_reused(tokenizer, documents, tmp_path):
    vocab = masked_lm_vocab(tokenizer)
    first = build_bert_datasets([documents], "1", (300, 0, 0), 64, 9, vocab,
                                cache_dir=str(tmp_path))[0]
    again = build_bert_datasets([documents], "1", (300, 0, 0), 64, 9, vocab,
                                cache_dir=str(tmp_path))[0]
    other = build_bert_datasets([documents], "1", (300, 0, 0), 64, 10, vocab,
                                cache_dir=str(tmp_path))[0]
    assert first.index_built and not again.index_built and other.index_built
    assert np.array_equal(first.sample_index, again.sample_index)
    assert not np.array_equal(first.sample_index, other.sample_index)
    for key in first[5]:
        assert np.array_equal(first[5][key], again[5][key])


def test_seeds_from_2_31_on(tokenizer, documents, tmp_path):
    # Megatron's sample index takes a C int; megalite continues the same formulas up to 2^32 - 1.
    vocab = masked_lm_vocab(tokenizer)
    a = build_bert_datasets([documents], "1", (200, 0, 0), 64, 2**32 - 1, vocab,
                            cache_dir=str(tmp_path / "a"))[0]
    b = build_bert_datasets([documents], "1", (200, 0, 0), 64, 2**32 - 1, vocab,
                            cache_dir=str(tmp_path / "b"))[0]
    assert a.index_built and b.index_built and np.array_equal(a.sample_index, b.sample_index)
    assert all(np.array_equal(a[-1][k], b[-1][k]) for k in a[-1])
    with pytest.raises(MegaliteError, match=r"--seed 4294967296"):
        build_bert_datasets([documents], "1", (200, 0, 0), 64, 2**32, vocab)


def test_unweighted_megatron_blend_takes_one_epoch_of_each(tokenizer, documents, tmp_path):
    # megatron-core 0.16.1 fails here (it passes None as the sample count to its C++ helper).
    vocab = masked_lm_vocab(tokenizer)
    train, _, _ = build_bert_datasets([documents, documents], "1", (500, 0, 0), 64, 3, vocab,
                                      cache_dir=str(tmp_path), blend_rule="megatron")
    one, two = train.datasets
    assert one.num_samples is None and one.document_stats["epochs"] == 1
    assert len(train) == 500 and np.array_equal(one.sample_index, two.sample_index)
    assert int(train[1]["dataset_id"]) == 1


def one_sentence_documents(prefix, source, count):
    """The first ``count`` documents of ``source`` as one sequence each (a file preprocessed
    without --split-sentences)."""
    src = IndexedDataset(source)
    with IndexedDatasetBuilder(prefix, src.dtype) as builder:
        for d in range(count):
            builder.add_document(np.asarray(src.document(d)))
        builder.finalize()
    return prefix


def test_bad_input_errors(tokenizer, documents, tmp_path):
    vocab = masked_lm_vocab(tokenizer, 1)
    cache = str(tmp_path / "cache")

    def bert(data, **kw):
        args = dict(split="1", num_samples=(50, 0, 0), seq_length=64, seed=1, vocab=vocab,
                    cache_dir=cache)
        args.update(kw)
        return build_bert_datasets(data, **args)

    with pytest.raises(MegaliteError, match=r"dataset prefix '.*nothing' not found"):
        bert([str(tmp_path / "nothing")])
    with pytest.raises(MegaliteError, match=r"--seq-length 4: must be an integer >= 5"):
        bert([documents], seq_length=4)
    with pytest.raises(MegaliteError, match=r"--mask-prob 1.5"):
        bert([documents], masking_probability=1.5)
    with pytest.raises(MegaliteError, match=r"--vocab-size 2000: .* has \d+ ids"):
        bert([documents], vocab_size=2000)
    # A file with an id past the vocabulary (another tokenizer's data), named.
    wide = str(tmp_path / "wide")
    with IndexedDatasetBuilder(wide, np.uint16) as builder:
        builder.add_document([5, 6, 3000, 7], [2, 2])
        builder.finalize()
    with pytest.raises(MegaliteError, match=r"wide.bin: token id 3000 is outside"):
        bert([wide])
    # Not sentence-split: no document has the two sentences a pair needs (T5 takes them).
    whole = one_sentence_documents(str(tmp_path / "whole"), documents, 50)
    with pytest.raises(MegaliteError, match=r"whole: no document of the train split .* 50 have "
                                            r"fewer than 2 sentences.*--split-sentences"):
        bert([whole])
    assert len(bert([whole], classification_head=False)[0]) >= 50
    # A split whose share rounds to no document but is asked for samples.
    with pytest.raises(MegaliteError, match=r"whole: the test split \(documents \[50, 50\) of "
                                            r"50\) holds no document"):
        bert([whole], split="98,1,1", num_samples=(10, 5, 5), classification_head=False)


def test_t5_errors(tokenizer, documents, tmp_path):
    def t5(vocab, decoder=32, seq=64):
        return build_t5_datasets([documents], "1", (50, 0, 0), seq, 1, vocab, decoder,
                                 cache_dir=str(tmp_path))[0]

    with pytest.raises(MegaliteError, match="needs sentinel tokens: give --vocab-extra-ids"):
        t5(masked_lm_vocab(tokenizer, 0))
    with pytest.raises(MegaliteError, match=r"--decoder-seq-length 1: T5 data needs"):
        t5(masked_lm_vocab(tokenizer, 5), decoder=1)
    dataset = t5(masked_lm_vocab(tokenizer, 1))
    with pytest.raises(MegaliteError, match=r"T5 sample \d+ of the train split has \d+ masked "
                                            r"spans but --vocab-extra-ids gives 1 sentinels"):
        for i in range(len(dataset)):
            dataset[i]
    dataset = t5(masked_lm_vocab(tokenizer, 100), decoder=4, seq=256)
    with pytest.raises(MegaliteError, match=r"needs \d+ decoder tokens but "
                                            r"--decoder-seq-length is 4"):
        for i in range(len(dataset)):
            dataset[i]
