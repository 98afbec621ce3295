"""BERT pretraining samples: ``[CLS] A [SEP] B [SEP]`` with masked-LM and sentence-order labels.

Equal to megatron-core 0.16.1's ``BERTMaskedWordPieceDataset`` (sample index, skipped
documents, masking: ``masked_dataset``). Item i, from the sentences of its sample index row
and its own ``RandomState(seed + i)``:

1. With the binary head (``classification_head``, Megatron-LM's ``--bert-no-binary-head``
   turns it off) the sentences are cut in two at a random sentence boundary (A = the first
   part, B = the rest; a two-sentence sample cuts between them) and with probability 1/2 the
   parts swap: ``is_random`` = 1, the sentence-order label. Without it A is every sentence and
   B is empty.
2. While A and B hold more than the target length, a token is dropped from the longer (B on a
   tie), at its front or back with probability 1/2 each (``truncated`` = 1).
3. ``[CLS] A [SEP] B [SEP]`` (no B part when B is empty); token types 0 for [CLS] A [SEP], 1
   for B [SEP].
4. Masking (``masked_dataset``): each masked token becomes [MASK] with probability 0.8, else
   a random id of the whole vocabulary (``vocab.size``) or itself, with probability 1/2 each.
5. Padding to ``seq_length``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from megalite.data.masked_dataset import (MaskedDataset, MaskedDatasetConfig,
                                          build_masked_datasets)
from megalite.errors import MegaliteError


@dataclass
class BERTDatasetConfig(MaskedDatasetConfig):
    classification_head: bool = True
    """Pairs for the binary (sentence-order) head: samples of >= 2 sentences, cut into A and B."""
    min_seq_length: ClassVar[int] = 5  # [CLS], two [SEP], 2 tokens


def trim_counts(length_a: int, length_b: int, draws: np.ndarray) -> tuple[int, int, int, int]:
    """Tokens dropped from (A's front, A's back, B's front, B's back) by Megatron's trimming:
    step t drops one token from the longer part (B on a tie), from its front when ``draws[t] <
    0.5``, else from its back; one step per draw.

    Which part a step trims depends only on the lengths, so the steps are laid out at once:
    the longer part first until A is one longer than B (A longer) or B one shorter than A (B
    longer or equal), then B, A, B, ... or A, B, A, ... alternately."""
    steps = len(draws)
    diff = length_a - length_b
    lead = min(diff if diff > 0 else 1 - diff, steps)
    on_a = np.empty(steps, dtype=bool)
    on_a[:lead] = diff > 0
    on_a[lead:] = np.arange(steps - lead) % 2 == (1 if diff > 0 else 0)
    front = draws < 0.5
    a_front = int(np.count_nonzero(on_a & front))
    b_front = int(np.count_nonzero(~on_a & front))
    a_steps = int(np.count_nonzero(on_a))
    return a_front, a_steps - a_front, b_front, steps - a_steps - b_front


class BERTDataset(MaskedDataset):
    """BERT samples of ``config.seq_length`` tokens (see the module docstring).

    Item: a dict of numpy arrays, megatron-core's fields (L = ``seq_length``):

    ``text`` int64 [L]: the tokens, padding 0; ``types`` int64 [L]: token types 0/1, padding
    0; ``labels`` int64 [L]: the original token at masked positions, else -1;
    ``loss_mask`` int64 [L]: 1 at masked positions; ``padding_mask`` int64 [L]: 1 for a token,
    0 for padding; ``is_random`` int64 []: 1 when A and B were swapped; ``truncated`` int64
    []: 1 when tokens were dropped to fit. As in Megatron, a token equal to [PAD] (a random
    replacement can be) counts as padding and reads 0 in ``text``.
    """

    kind = "BERT"

    def __init__(self, indexed, document_range, num_samples, config: BERTDatasetConfig,
                 name: str = "train"):
        config.check()
        # [CLS] and two [SEP] around at most seq_length - 3 tokens of sentences.
        super().__init__(indexed, document_range, num_samples, config, name,
                         max_len=config.seq_length - 3,
                         min_sentences=2 if config.classification_head else 1)

    def _replacement(self, rng: np.random.RandomState) -> int | None:
        if rng.random() < 0.8:
            return self.vocab.mask
        if rng.random() >= 0.5:
            return int(rng.randint(0, self.vocab.size))
        return None

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        rng, sentences, target = self._sample(i)
        v, length = self.vocab, self.config.seq_length
        pivot, is_random = len(sentences), False
        if self.config.classification_head:
            if len(sentences) < 2:  # the sample index never makes one
                raise MegaliteError(f"BERT sample {i}: one sentence, but the binary head needs two")
            pivot = int(rng.randint(low=1, high=len(sentences))) if len(sentences) >= 3 else 1
            is_random = rng.random() < 0.5
        a = np.concatenate(sentences[:pivot]).astype(np.int64)
        b = np.concatenate(sentences[pivot:] or [np.zeros(0, np.int64)]).astype(np.int64)
        if is_random:
            a, b = b, a
        excess = len(a) + len(b) - target
        if excess > 0:
            af, ab, bf, bb = trim_counts(len(a), len(b), rng.random_sample(excess))
            a, b = a[af:len(a) - ab], b[bf:len(b) - bb]
        parts = [[v.cls], a, [v.sep]] + ([b, [v.sep]] if len(b) else [])
        tokens = np.concatenate(parts).astype(np.int64)
        n = len(tokens)
        masked, positions, _ = self.mask(tokens, target, rng)

        text = np.zeros(length, dtype=np.int64)
        text[:n] = masked
        padding_mask = np.zeros(length, dtype=np.int64)
        padding_mask[:n] = masked != v.pad
        text[text == v.pad] = 0
        types = np.zeros(length, dtype=np.int64)
        types[len(a) + 2:n] = 1
        labels = np.full(length, -1, dtype=np.int64)
        labels[positions] = tokens[positions]
        labels[labels == v.pad] = 0
        loss_mask = np.zeros(length, dtype=np.int64)
        loss_mask[positions] = 1
        return {"text": text, "types": types, "labels": labels,
                "is_random": np.array(int(is_random), dtype=np.int64),
                "padding_mask": padding_mask, "loss_mask": loss_mask,
                "truncated": np.array(int(excess > 0), dtype=np.int64)}


def build_bert_datasets(data_path: list[str], split: str, num_samples: tuple[int, int, int],
                        seq_length: int, seed: int, vocab, cache_dir: str | None = None,
                        vocab_size: int | None = None, blend_rule: str = "megalite",
                        **options) -> tuple:
    """Train, valid and test :class:`BERTDataset` over ``data_path``, called like the GPT
    builder (``blended.build_train_valid_test_datasets``) plus ``vocab`` (a ``MaskedLMVocab``,
    ``masked_dataset.masked_lm_vocab``); ``options``: the other :class:`BERTDatasetConfig`
    fields (``classification_head``, masking settings). None for a split with no samples."""
    config = BERTDatasetConfig(seq_length=seq_length, vocab=vocab, seed=seed, cache_dir=cache_dir,
                               **options)
    config.check()
    return build_masked_datasets(BERTDataset, config, data_path, split, num_samples, vocab_size,
                                 blend_rule)


class MockBERTDataset:
    """``--mock-data`` for BERT: item i is drawn by a generator seeded with ``(seed, i)``, no
    files needed: ``[CLS] A [SEP] B [SEP]`` filling ``seq_length`` (no padding), A and B random
    ids in ``[4, vocab_size)`` split at a random point, ``mask_prob`` of them replaced by
    [MASK] and predicted, a random sentence-order label. Ids 0-3 stand for [PAD], [CLS],
    [SEP], [MASK]. The fields are :class:`BERTDataset`'s."""

    PAD, CLS, SEP, MASK = 0, 1, 2, 3

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int,
                 mask_prob: float = 0.15):
        if vocab_size <= self.MASK + 1 or seq_length < BERTDatasetConfig.min_seq_length:
            raise MegaliteError(f"mock BERT data needs --vocab-size > 4 and --seq-length >= "
                                f"{BERTDatasetConfig.min_seq_length}, got {vocab_size} and "
                                f"{seq_length}")
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.mask_prob = seed, mask_prob

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(i)])
        n = self.seq_length
        body = rng.integers(self.MASK + 1, self.vocab_size, n - 3, dtype=np.int64)
        cut = int(rng.integers(1, n - 3))                      # A = body[:cut], B = the rest
        tokens = np.concatenate([[self.CLS], body[:cut], [self.SEP], body[cut:], [self.SEP]])
        candidates = np.concatenate([np.arange(1, cut + 1), np.arange(cut + 2, n - 1)])
        k = max(1, int(round(len(candidates) * self.mask_prob)))
        positions = np.sort(rng.choice(candidates, k, replace=False))
        labels = np.full(n, -1, dtype=np.int64)
        labels[positions] = tokens[positions]
        text = tokens.copy()
        text[positions] = self.MASK
        loss_mask = np.zeros(n, dtype=np.int64)
        loss_mask[positions] = 1
        types = np.zeros(n, dtype=np.int64)
        types[cut + 2:] = 1
        return {"text": text, "types": types, "labels": labels,
                "is_random": np.array(int(rng.integers(0, 2)), dtype=np.int64),
                "padding_mask": np.ones(n, dtype=np.int64), "loss_mask": loss_mask,
                "truncated": np.array(0, dtype=np.int64)}
