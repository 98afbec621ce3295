"""megalite's BERT and T5 datasets against megatron-core 0.16.1's, on real text.

The built-in corpus, sentence-split by ``megalite preprocess --split-sentences`` with a WordPiece
vocab trained on it, is read by both: megatron-core's ``BERTMaskedWordPieceDataset`` /
``T5MaskedWordPieceDataset`` (through its ``BlendedMegatronDatasetBuilder``, given Megatron-LM's
BERT tokenizer attributes over the same vocab: ``masked_reference``) and megalite's. For the same
seed, split, lengths and masking settings every split's sample index must be equal, and every
field of every sample (exact integers, no tolerance); so must the skipped-document counts
Megatron's helper prints, and blends under ``blend_rule="megatron"``.

Megatron's masked datasets read ``torch.distributed``, so the module runs in a one-process gloo
group.
"""
import re
import warnings

import numpy as np
import pytest
from masked_reference import megalite_train_splits, megatron_masked_datasets

from megalite.data.bert_dataset import build_bert_datasets
from megalite.data.blended import BlendedDataset
from megalite.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalite.data.masked_dataset import masked_lm_vocab
from megalite.data.t5_dataset import build_t5_datasets
from megalite.data.tokenizers import build_tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets import helpers as megatron_helpers
    from megatron.core.datasets.blended_dataset import BlendedDataset as MegatronBlended

from megalite import _C

SPLIT = "90,8,2"


pytestmark = pytest.mark.usefixtures("one_process_group")


@pytest.fixture(scope="module")
def tokenizer(wordpiece_vocab):
    return build_tokenizer("BertWordPieceLowerCase", vocab_file=wordpiece_vocab)


@pytest.fixture(scope="module")
def sentences(corpus_jsonl, wordpiece_vocab, tmp_path_factory):
    """The corpus, one sequence per sentence (~3,100 documents, ~33,000 sentences, a few of
    them over 512 tokens)."""
    from megalite.dataprep import preprocess_data

    prefix = str(tmp_path_factory.mktemp("wp_sentences") / "corpus")
    assert preprocess_data.main(["--input", corpus_jsonl, "--output-prefix", prefix,
                                 "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                                 wordpiece_vocab, "--split-sentences", "--workers", "1",
                                 "--log-interval", "1000000"]) == 0
    return prefix + "_text_sentence"


@pytest.fixture(scope="module")
def odd_documents(sentences, tmp_path_factory):
    """Real sentences regrouped so that every kind of document occurs: empty ones, single
    sentences (short and over 512 tokens), and the corpus's own documents."""
    src = IndexedDataset(sentences)
    lengths = np.asarray(src.sequence_lengths)
    long_ids = np.flatnonzero(lengths > 512).tolist()
    prefix = str(tmp_path_factory.mktemp("odd") / "odd")
    with IndexedDatasetBuilder(prefix, src.dtype) as builder:
        for d in range(600):
            sents = [np.asarray(src[s]) for s in src.document_sequences(d)]
            builder.add_document(np.concatenate(sents), [len(s) for s in sents])
            if d % 7 == 0:
                builder.add_document(np.zeros(0, np.int64), [])
            if d % 5 == 0:
                one = np.asarray(src[src.document_sequences(d)[0]])
                builder.add_document(one, [len(one)])
            if d % 50 == 0:
                long = np.asarray(src[long_ids[d // 50 % len(long_ids)]])
                builder.add_document(long, [len(long)])
        builder.finalize()
    return prefix


def assert_same_fields(ours, theirs):
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert set(a) == set(b), i
        for key in a:
            assert np.array_equal(a[key], b[key]), (i, key, a[key], b[key])
            assert a[key].dtype == np.int64


def assert_same_masked(ours, theirs):
    assert ours.num_samples == theirs.num_samples
    assert ours.document_range == (int(theirs.indices[0]), int(theirs.indices[-1]) + 1)
    assert ours.sample_index.dtype == theirs.sample_index.dtype
    assert np.array_equal(ours.sample_index, theirs.sample_index)
    assert_same_fields(ours, theirs)


def assert_same_splits(ours, theirs):
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if isinstance(b, MegatronBlended):
            assert isinstance(a, BlendedDataset) and a.blend_rule == "megatron"
            assert np.array_equal(a.dataset_index, b.dataset_index)
            assert np.array_equal(a.dataset_sample_index, b.dataset_sample_index)
            for x, y in zip(a.datasets, b.datasets):  # every item of the blend compared below
                assert x.num_samples == y.num_samples
                assert np.array_equal(x.sample_index, y.sample_index)
            assert_same_fields(a, b)
        else:
            assert_same_masked(a, b)


# masking: megatron-core's field names; the first case of each family is Megatron-LM's defaults.
# (file, seed, sequence length, samples per split, masking: megatron-core's field names). The
# first case of each family is Megatron-LM's settings; "odd" is the smaller file, for the
# short sequences (a dataset holds whole epochs, and every sample is compared).
BERT_CASES = [
    ("corpus", 1234, 128, (3000, 300, 60), 1, dict(classification_head=True)),
    ("corpus", 0, 128, (2000, 200, 40), 1, dict(classification_head=False,
                                                masking_do_full_word=False,
                                                masking_use_geometric_distribution=False)),
    ("odd", 2**31 - 1, 64, (4000, 100, 10), 2, dict(classification_head=True,
                                                    masking_do_full_word=False,
                                                    masking_use_longer_ngrams=True,
                                                    masking_use_geometric_distribution=False,
                                                    short_sequence_probability=0.3)),
    ("corpus", 77, 512, (1500, 100, 20), 1, dict(classification_head=False, masking_max_ngram=5,
                                                 masking_probability=0.3)),
]


@pytest.mark.parametrize("data,seed,seq_length,sizes,epochs,masking", BERT_CASES)
def test_bert_equals_megatrons(tokenizer, sentences, odd_documents, tmp_path, data, seed,
                               seq_length, sizes, epochs, masking):
    prefix = sentences if data == "corpus" else odd_documents
    vocab = masked_lm_vocab(tokenizer)
    ours = build_bert_datasets([prefix], SPLIT, sizes, seq_length, seed, vocab,
                               cache_dir=str(tmp_path / "o"), **masking)
    theirs = megatron_masked_datasets("bert", tokenizer, [prefix], None, SPLIT, sizes,
                                      seq_length, seed, tmp_path / "m", **masking)
    assert_same_splits(ours, theirs)
    train = ours[0]
    assert train.document_stats["epochs"] == epochs
    # Real variety: both sentence orders, truncated samples, padding.
    items = [train[i] for i in range(200)]
    assert {int(x["is_random"]) for x in items} == ({0, 1} if masking["classification_head"]
                                                    else {0})
    assert any(x["truncated"] for x in items) and any(x["padding_mask"][-1] == 0 for x in items)


# (file, seed, encoder and decoder lengths, --vocab-extra-ids, samples per split, masking)
T5_CASES = [
    ("corpus", 1234, 128, 64, 100, (3000, 300, 60), {}),
    ("odd", 5, 64, 24, 10, (3000, 100, 10), dict(masking_do_full_word=False,
                                                 short_sequence_probability=0.25)),
    ("corpus", 99, 256, 128, 40, (800, 80, 20), dict(masking_use_geometric_distribution=False,
                                                     masking_use_longer_ngrams=True,
                                                     masking_max_ngram=4)),
]


@pytest.mark.parametrize("data,seed,seq_length,decoder_length,extra_ids,sizes,masking",
                         T5_CASES)
def test_t5_equals_megatrons(tokenizer, sentences, odd_documents, tmp_path, data, seed,
                             seq_length, decoder_length, extra_ids, sizes, masking):
    prefix = sentences if data == "corpus" else odd_documents
    vocab = masked_lm_vocab(tokenizer, extra_ids)
    assert len(vocab.sentinels) == extra_ids and vocab.size == tokenizer.vocab_size + 2 + extra_ids
    ours = build_t5_datasets([prefix], SPLIT, sizes, seq_length, seed, vocab, decoder_length,
                             cache_dir=str(tmp_path / "o"), **masking)
    theirs = megatron_masked_datasets("t5", tokenizer, [prefix], None, SPLIT, sizes,
                                      seq_length, seed, tmp_path / "m", vocab_extra_ids=extra_ids,
                                      decoder_seq_length=decoder_length, **masking)
    assert_same_splits(ours, theirs)
    items = [ours[0][i] for i in range(200)]
    assert any(x["truncated"] for x in items)
    assert any((x["text_enc"] == vocab.sentinels[1]).any() for x in items)


def megatron_counts(starts, sizes, min_sentences, capfd):
    """The document counts megatron-core's build_mapping prints when verbose."""
    capfd.readouterr()
    megatron_helpers.build_mapping(starts, sizes, 1, 10**9, 509, 0.1, 1, True, min_sentences)
    out = capfd.readouterr().out
    return [int(re.search(pattern + r":\s*(\d+)", out).group(1)) for pattern in (
        "number of empty documents", "number of documents with one sentence",
        "number of documents with long sentences")]


@pytest.mark.parametrize("min_sentences", [1, 2])
def test_skipped_documents_counted_as_megatron_does(odd_documents, capfd, min_sentences):
    indexed = IndexedDataset(odd_documents)
    starts, sizes = np.asarray(indexed.document_indices), np.asarray(indexed.sequence_lengths)
    rows, stats = _C.build_masked_sample_index(starts, sizes, -1, 509, 0.1, 1, min_sentences)
    (empty, one, long), s = megatron_counts(starts, sizes, min_sentences, capfd), stats.tolist()
    assert (s[0], s[1], s[2], s[3]) == (indexed.num_documents, empty, one, long)
    assert empty == 86 and one == 120 + 12 and long >= 1  # the documents odd_documents adds
    skipped_few = empty + (one if min_sentences == 2 else 0)
    assert (s[4], s[5]) == (skipped_few, long)
    # Megatron's one epoch (num_epochs 1, no sample limit) gives the same rows.
    theirs = megatron_helpers.build_mapping(starts, sizes, 1, 2**63, 509, 0.1, 1, False,
                                            min_sentences)
    assert np.array_equal(rows, theirs)
    # No sample holds a skipped document's sentence.
    docs = np.searchsorted(starts, rows[:, 0], side="right") - 1
    used = np.diff(starts)[docs]
    assert used.min() >= min_sentences


def test_skip_counts_reach_the_dataset(tokenizer, odd_documents, tmp_path):
    bert, t5 = megalite_train_splits(odd_documents, masked_lm_vocab(tokenizer, 5), 500, 128, 3,
                                     64, tmp_path)
    b, t = bert.document_stats, t5.document_stats
    assert b["skipped_too_few_sentences"] == b["empty"] + b["one_sentence"] == 86 + 132
    assert t["skipped_too_few_sentences"] == t["empty"] == 86
    assert b["skipped_long_sentence"] == t["skipped_long_sentence"] == b["long_sentence"] > 0


@pytest.mark.parametrize("seed,short_seq_prob,min_sentences,samples", [
    (0, 0.1, 2, 50000), (2**31 - 1, 0.0, 1, 7), (31337, 1.0, 2, 123456), (1, 0.07, 1, 1)])
def test_sample_index_equals_megatrons_helper(sentences, seed, short_seq_prob, min_sentences,
                                              samples):
    indexed = IndexedDataset(sentences)
    starts = np.asarray(indexed.document_indices)[100:2900]
    sizes = np.asarray(indexed.sequence_lengths)
    ours, stats = _C.build_masked_sample_index(starts, sizes, samples, 253, short_seq_prob, seed,
                                               min_sentences)
    theirs = megatron_helpers.build_mapping(starts, sizes, 2**31 - 2, samples, 253,
                                            short_seq_prob, seed, False, min_sentences)
    assert ours.dtype == theirs.dtype == np.uint32
    assert np.array_equal(ours, theirs)
    assert len(ours) >= samples and stats[-1] >= 1


def test_megatron_blend_rule_equals_megatrons(tokenizer, sentences, odd_documents, tmp_path):
    vocab = masked_lm_vocab(tokenizer, 30)
    for kind, build, extra in (("bert", build_bert_datasets, {}),
                               ("t5", build_t5_datasets, {"decoder_seq_length": 48})):
        data_path = ["0.7", sentences, "0.3", odd_documents]
        ours = build(data_path, SPLIT, (1500, 150, 30), 96, 11, vocab,
                     cache_dir=str(tmp_path / "o"), blend_rule="megatron", **extra)
        theirs = megatron_masked_datasets(
            kind, tokenizer, [sentences, odd_documents], [0.7, 0.3], SPLIT, (1500, 150, 30), 96,
            11, tmp_path / "m", vocab_extra_ids=30,
            decoder_seq_length=extra.get("decoder_seq_length"))
        assert_same_splits(ours, theirs)


def test_pad_id_not_zero(corpus_jsonl, wordpiece_vocab, tmp_path):
    """With [PAD] at id 5, Megatron writes 5 into BERT's padding_mask and token types at
    padding; megalite writes 0 there (a mask and type ids stay 0/1). Every other field, and all
    of T5's, stay equal."""
    from megalite.dataprep import preprocess_data

    words = open(wordpiece_vocab, encoding="utf-8").read().split("\n")
    pad = words.index("[PAD]")
    words[pad], words[5] = words[5], words[pad]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(words), encoding="utf-8")
    lines = open(corpus_jsonl, encoding="utf-8").readlines()[:300]
    (tmp_path / "in.jsonl").write_text("".join(lines), encoding="utf-8")
    prefix = str(tmp_path / "pad5")
    assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", prefix,
                                 "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                                 str(vocab_file), "--split-sentences", "--workers", "1",
                                 "--log-interval", "1000000"]) == 0
    prefix += "_text_sentence"
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(vocab_file))
    vocab = masked_lm_vocab(tokenizer, 20)
    assert vocab.pad == 5
    sizes = (400, 0, 0)
    ours = build_bert_datasets([prefix], "1", sizes, 96, 4, vocab, cache_dir=str(tmp_path / "o"))
    theirs = megatron_masked_datasets("bert", tokenizer, [prefix], None, "1", sizes, 96, 4,
                                      tmp_path / "m", vocab_extra_ids=20)
    padded = 0
    for i in range(len(ours[0])):
        a, b = ours[0][i], theirs[0][i]
        for key in ("text", "labels", "loss_mask", "is_random", "truncated"):
            assert np.array_equal(a[key], b[key]), (i, key)
        assert set(np.unique(b["padding_mask"])) <= {1, 5}
        assert np.array_equal(a["padding_mask"], (b["padding_mask"] == 1).astype(np.int64))
        assert np.array_equal(a["types"], np.where(b["types"] == 5, 0, b["types"]))
        padded += int((a["padding_mask"] == 0).any())
    assert padded > 0
    ours = build_t5_datasets([prefix], "1", sizes, 96, 4, vocab, 48, cache_dir=str(tmp_path / "o"))
    theirs = megatron_masked_datasets("t5", tokenizer, [prefix], None, "1", sizes, 96, 4,
                                      tmp_path / "m", vocab_extra_ids=20, decoder_seq_length=48)
    assert_same_splits(ours, theirs)
