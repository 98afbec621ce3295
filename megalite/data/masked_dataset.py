"""What the BERT and T5 datasets share: their vocabulary, sample index and n-gram masking.

Both read a sentence-split token file (``megalite preprocess --split-sentences``: one sequence
per sentence, documents in the ``.idx``) and equal megatron-core 0.16.1's
``BERTMaskedWordPieceDataset`` / ``T5MaskedWordPieceDataset`` sample for sample, field for field,
for the same seed, split, lengths and masking settings (the tests compare them with the
installed megatron-core):

* Split: over *documents* (Megatron's masked datasets count documents, where GPT counts
  sequences): split k covers documents ``[round(c[k] * D), round(c[k+1] * D))``.
* Sample index (``megalite._C.build_masked_sample_index``, rules in
  ``csrc/masked_helpers.cpp``): rows (first sentence, end sentence, target length) of
  consecutive sentences of one document, shuffled; target lengths up to ``max_len`` (BERT
  ``seq_length - 3``, T5 ``seq_length - 2``), shorter with ``short_sequence_probability``. A
  document with fewer sentences than a sample needs (BERT with the binary head: 2, else 1), or
  with several sentences one of which is over 512 tokens, is skipped and counted
  (``document_stats``). Cached like the GPT indices (``index_cache``).
* Item i draws from its own ``numpy.random.RandomState((seed + i) % 2**32)``, in Megatron's
  order, so it does not depend on which items were read before.
* Masking (:meth:`MaskedDataset.mask`): WordPiece words (a ``##`` piece joins the word before
  it under ``masking_do_full_word``) are the candidates, [CLS]/[SEP] never; candidates are
  shuffled, and for each an n-gram length is drawn (1..``masking_max_ngram``, probability
  proportional to 1/n, or SpanBERT's geometric(0.2) clipped), shortened until it fits in the
  budget ``min(p * target, max(1, round(len * p)))``; n-grams overlapping an earlier one are
  passed over.

Megatron's ``masking_do_permutation`` is not offered: Megatron draws it from numpy's global
generator, so its samples would not follow from the seed.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from megalite.data.gpt_dataset import _prefix_of, check_seed
from megalite.data.index_cache import default_cache_dir, file_identity, load_or_build
from megalite.errors import MegaliteError

# What build_masked_sample_index counts, in its order (csrc/masked_helpers.cpp).
DOCUMENT_STATS = ("documents", "empty", "one_sentence", "long_sentence",
                  "skipped_too_few_sentences", "skipped_long_sentence", "epochs")
# SpanBERT's n-gram length distribution (Megatron's masking_use_geometric_distribution).
GEOMETRIC_P = 0.2
# One RandomState per thread, reseeded per item: seed() resets the whole legacy state (what a
# new RandomState(seed) holds) at 1/60 of the cost of constructing one.
_THREAD = threading.local()


def random_state(seed: int) -> np.random.RandomState:
    """This thread's ``RandomState``, in the state ``numpy.random.RandomState(seed)`` starts in."""
    rng = getattr(_THREAD, "rng", None)
    if rng is None:
        rng = _THREAD.rng = np.random.RandomState()
    rng.seed(seed)
    return rng


@dataclass(frozen=True)
class MaskedLMVocab:
    """The ids the BERT/T5 datasets use, over the vocabulary Megatron-LM's BERT tokenizer makes.

    ``size``: the WordPiece vocabulary plus the tokens appended to it, in Megatron-LM's order:
    ``[BOS]`` and ``[EOS]`` (each unless the vocab has it), then ``<extra_id_0>`` ..
    ``<extra_id_{N-1}>`` (``--vocab-extra-ids N``, T5's sentinels). The model's vocabulary must
    hold all ``size`` ids: BERT's random replacement draws from them all, as Megatron's does.
    ``continuation``: bool ``[size]``, True for a ``##`` piece."""

    cls: int
    sep: int
    mask: int
    pad: int
    bos: int
    eos: int
    sentinels: tuple[int, ...]
    size: int
    continuation: np.ndarray = field(repr=False, compare=False)
    source: str = ""


def masked_lm_vocab(tokenizer, vocab_extra_ids: int = 0) -> MaskedLMVocab:
    """The :class:`MaskedLMVocab` of a megalite ``BertWordPieceTokenizer`` (``--tokenizer-type
    BertWordPieceLowerCase`` / ``BertWordPieceCase``) with ``vocab_extra_ids`` sentinels."""
    from tokenizers import models

    from megalite.data.tokenizers import BertWordPieceTokenizer

    if not isinstance(tokenizer, BertWordPieceTokenizer):
        raise MegaliteError(f"BERT and T5 data need a WordPiece vocabulary (--tokenizer-type "
                            f"BertWordPieceLowerCase or BertWordPieceCase); got "
                            f"{type(tokenizer).__name__} ({getattr(tokenizer, 'source', '')})")
    if isinstance(vocab_extra_ids, bool) or not isinstance(vocab_extra_ids, int) or \
            vocab_extra_ids < 0:
        raise MegaliteError(f"--vocab-extra-ids {vocab_extra_ids!r}: expected an integer >= 0")
    source = f"--vocab-file {tokenizer.vocab_file}"
    vocab = dict(models.WordPiece.read_file(tokenizer.vocab_file))  # the tokenizer's own ids
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MegaliteError(f"{source}: the vocab has repeated tokens (ids are not "
                            f"0..{len(vocab) - 1})")
    for token in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"):
        if token not in vocab:
            raise MegaliteError(f"{source}: no {token} token in the vocab (BERT/T5 data need "
                                "[CLS], [SEP], [MASK] and [PAD])")
    extra = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
    for token in ["[BOS]", "[EOS]"] + extra:  # Megatron-LM's add_token: append unless present
        vocab.setdefault(token, len(vocab))
    tokens = sorted(vocab, key=vocab.get)
    continuation = np.fromiter((t.startswith("##") for t in tokens), dtype=bool, count=len(tokens))
    return MaskedLMVocab(cls=vocab["[CLS]"], sep=vocab["[SEP]"], mask=vocab["[MASK]"],
                         pad=vocab["[PAD]"], bos=vocab["[BOS]"], eos=vocab["[EOS]"],
                         sentinels=tuple(vocab[t] for t in extra), size=len(vocab),
                         continuation=continuation, source=source)


@dataclass
class MaskedDatasetConfig:
    """Settings shared by the BERT and T5 datasets (megatron-core's field names for the masking
    ones; the defaults are Megatron-LM's ``--mask-prob`` / ``--short-seq-prob`` and its
    ``pretrain_bert.py`` masking)."""

    seq_length: int
    """Tokens per sample: BERT's whole input with [CLS] and [SEP]s; T5's encoder input."""
    vocab: MaskedLMVocab
    seed: int = 1234
    """Seed of the sample index and of item i's ``RandomState(seed + i)``, in [0, 2^32 - 1]."""
    masking_probability: float = 0.15
    short_sequence_probability: float = 0.1
    """Share of samples whose target length is drawn uniformly from [2, max_len]."""
    masking_max_ngram: int = 3
    masking_do_full_word: bool = True
    """Mask whole WordPiece words (a word and its ``##`` pieces), else single pieces."""
    masking_use_longer_ngrams: bool = False
    """n-gram lengths with probability proportional to 1/(max+1-n) instead of 1/n."""
    masking_use_geometric_distribution: bool = True
    """n-gram lengths from geometric(0.2) clipped to the maximum (overrides the line above)."""
    cache_dir: str | None = None

    min_seq_length: ClassVar[int] = 4
    """The special tokens around a sample plus a target length of at least 2."""

    def check(self) -> None:
        """MegaliteError naming the flag for a bad setting."""
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, int) or \
                self.seq_length < self.min_seq_length:
            raise MegaliteError(f"--seq-length {self.seq_length!r}: must be an integer >= "
                                f"{self.min_seq_length} for this dataset")
        check_seed(self.seed)
        if not 0 < self.masking_probability < 1:
            raise MegaliteError(f"--mask-prob {self.masking_probability}: must lie in (0, 1)")
        if not 0 <= self.short_sequence_probability <= 1 or \
                0 < self.short_sequence_probability < 2.0**-31:
            raise MegaliteError(f"--short-seq-prob {self.short_sequence_probability}: must be 0 "
                                "or lie in [2^-31, 1]")
        if isinstance(self.masking_max_ngram, bool) or not isinstance(self.masking_max_ngram, int) \
                or self.masking_max_ngram < 1:
            raise MegaliteError(f"masking_max_ngram {self.masking_max_ngram!r}: must be >= 1")


class MaskedDataset(torch.utils.data.Dataset):
    """Samples of consecutive sentences of the documents ``document_range`` of ``indexed``.

    ``num_samples``: how many the caller will read (None: one epoch); the dataset holds every
    sample of the epochs that takes, ``len(self) >= num_samples``. ``document_stats``: the
    counts of ``DOCUMENT_STATS`` for this range (documents skipped and why). Subclasses set
    ``kind`` and the sample index shape (``max_len``, ``min_sentences``) and build the items."""

    kind = "masked"

    def __init__(self, indexed, document_range: tuple[int, int], num_samples: int | None,
                 config: MaskedDatasetConfig, name: str, max_len: int, min_sentences: int):
        self.indexed, self.config, self.name, self.vocab = indexed, config, name, config.vocab
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = check_seed(config.seed)
        prefix = _prefix_of(indexed)
        lo, hi = (int(x) for x in document_range)
        num_docs = len(indexed.document_indices) - 1
        if not 0 <= lo <= hi <= num_docs:
            raise MegaliteError(f"{prefix}: document range [{lo}, {hi}) of the {name} split is "
                                f"outside the {num_docs} documents")
        if self.num_samples is not None and self.num_samples < 1:
            raise MegaliteError(f"{prefix}: the {name} split needs num_samples >= 1, got "
                                f"{num_samples}")
        if hi == lo:
            raise MegaliteError(f"{prefix}: the {name} split (documents [{lo}, {hi}) of "
                                f"{num_docs}) holds no document, so it cannot supply samples; "
                                "give it a larger share in --split or use more data")
        self.document_range = (lo, hi)
        description = {"kind": "masked-sample-index", "idx": file_identity(prefix + ".idx"),
                       "split": name, "document_range": [lo, hi],
                       "num_samples": self.num_samples, "max_len": max_len,
                       "short_sequence_probability": config.short_sequence_probability,
                       "seed": self.seed, "min_sentences": min_sentences}

        def build() -> dict[str, np.ndarray]:
            from megalite import _C   # where used: mock-data runs need no C++ extension

            starts = np.ascontiguousarray(indexed.document_indices[lo:hi + 1], dtype=np.int64)
            rows, stats = _C.build_masked_sample_index(
                starts, np.asarray(indexed.sequence_lengths), -1 if num_samples is None else
                self.num_samples, max_len, float(config.short_sequence_probability), self.seed,
                min_sentences)
            return {"sample_index": rows, "document_stats": stats}

        arrays, self.index_built = load_or_build(
            default_cache_dir(prefix, config.cache_dir), description,
            ["sample_index", "document_stats"], build)
        self.sample_index = arrays["sample_index"]
        self.document_stats = dict(zip(DOCUMENT_STATS, (int(x) for x in arrays["document_stats"])))
        if len(self.sample_index) == 0:
            s = self.document_stats
            raise MegaliteError(
                f"{prefix}: no document of the {name} split (documents [{lo}, {hi})) can make a "
                f"{self.kind} sample: {s['skipped_too_few_sentences']} have fewer than "
                f"{min_sentences} sentences, {s['skipped_long_sentence']} a sentence over 512 "
                "tokens; was the file made with --split-sentences?")
        self._init_masking()

    def _init_masking(self) -> None:
        c = self.config
        # Megatron's n-gram choice: numpy's choice(1..N, p) draws one random_sample() and
        # searches the normalised cumulative sum; the same floats, computed as numpy does.
        values = np.arange(c.masking_max_ngram, dtype=np.int64) + 1
        probs = 1.0 / values
        probs = probs / probs.sum(keepdims=True)
        if c.masking_use_longer_ngrams:
            probs = probs[::-1]
        probs = probs / probs.sum(keepdims=True)
        cdf = probs.cumsum()
        cdf /= cdf[-1]
        self._ngram_cdf = cdf.tolist()

    def __len__(self) -> int:
        return len(self.sample_index)

    def _sample(self, i) -> tuple[np.random.RandomState, list[np.ndarray], int]:
        """(item i's generator, its sentences as token arrays, its target length)."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        begin, end, target = (int(x) for x in self.sample_index[i])
        rng = random_state((self.seed + i) % 2**32)
        return rng, [self.indexed[s] for s in range(begin, end)], target

    def _ngram_length(self, rng: np.random.RandomState) -> int:
        c = self.config
        if c.masking_use_geometric_distribution:
            return min(int(rng.geometric(GEOMETRIC_P)), c.masking_max_ngram)
        return bisect.bisect_right(self._ngram_cdf, rng.random_sample()) + 1

    def _replacement(self, rng: np.random.RandomState) -> int | None:
        """The id a masked token becomes (None: it stays); draws what Megatron draws."""
        raise NotImplementedError

    def mask(self, tokens: np.ndarray, target: int, rng: np.random.RandomState
             ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Megatron's masked-LM predictions over int64 ``tokens`` ``[L]``.

        Returns (the tokens with the masked ones replaced ``[L]``, the masked positions in
        increasing order ``[M]``, the masked spans in order of position: each an int64 array
        of its positions, consecutive apart from [CLS]/[SEP] between them)."""
        c, v = self.config, self.vocab
        special = (tokens == v.cls) | (tokens == v.sep)
        positions = np.flatnonzero(~special)                       # candidates' tokens
        if c.masking_do_full_word:
            starts = np.flatnonzero(~v.continuation[tokens[positions]])
            if len(positions) and (len(starts) == 0 or starts[0] != 0):
                starts = np.concatenate([[0], starts])             # a leading ## piece
        else:
            starts = np.arange(len(positions))
        # Candidate k is positions[bounds[k]:bounds[k + 1]]; an n-gram from k is
        # positions[bounds[k]:bounds[min(k + n, count)]].
        bounds = starts.tolist() + [len(positions)]
        count = len(starts)
        budget = min(c.masking_probability * target,
                     max(1, int(round(len(tokens) * c.masking_probability))))
        order = np.arange(count)
        rng.shuffle(order)
        taken = bytearray(len(positions))
        out = tokens.copy()
        masked, spans = 0, []
        for k in order.tolist():
            if masked >= budget:
                break
            n = self._ngram_length(rng)
            while True:  # shorten the n-gram until it fits in the budget
                lo, hi = bounds[k], bounds[min(k + n, count)]
                n -= 1
                if budget >= masked + (hi - lo):
                    break
                if n == 0:
                    lo = None
                    break
            if lo is None or 1 in taken[lo:hi]:
                continue
            taken[lo:hi] = b"\x01" * (hi - lo)
            span = positions[lo:hi]
            for p in span.tolist():
                replacement = self._replacement(rng)
                if replacement is not None:
                    out[p] = replacement
            masked += hi - lo
            spans.append((lo, span))
        spans.sort(key=lambda s: s[0])
        masked_positions = positions[np.frombuffer(bytes(taken), dtype=np.uint8).astype(bool)]
        return out, masked_positions, [s for _, s in spans]


def build_masked_datasets(dataset_class, config: MaskedDatasetConfig, data_path: list[str],
                          split: str, num_samples, vocab_size: int | None = None,
                          blend_rule: str = "megalite"):
    """Train, valid and test ``dataset_class`` datasets over ``data_path``: split over each
    file's documents, blended and cached as the GPT datasets are (``blended``). Token ids are
    checked against the vocabulary with its added tokens (``config.vocab.size``); the model's
    ``vocab_size``, when given, must hold them all."""
    from megalite.data.blended import build_split_datasets

    if vocab_size is not None and vocab_size < config.vocab.size:
        raise MegaliteError(
            f"--vocab-size {vocab_size}: the {dataset_class.kind} vocabulary "
            f"({config.vocab.source} with [BOS], [EOS] and {len(config.vocab.sentinels)} --vocab-extra-ids tokens) has "
            f"{config.vocab.size} ids; the model must hold them all")
    return build_split_datasets(
        data_path, split, num_samples,
        lambda indexed, docs, n, name: dataset_class(indexed, docs, n, config, name),
        units="documents", cache_dir=config.cache_dir, vocab_size=config.vocab.size,
        blend_rule=blend_rule)
