"""T5 pretraining samples: span corruption with sentinel tokens.

Equal to megatron-core 0.16.1's ``T5MaskedWordPieceDataset`` (sample index, skipped documents,
masking: ``masked_dataset``; Megatron-LM's ``pretrain_t5.py`` masks n-grams of up to 10 words).
Item i, from the sentences of its sample index row and its own ``RandomState(seed + i)``: the
sentences joined and cut to the target length (``truncated`` = 1 when cut), its masked spans
chosen, then, with S_k the k-th sentinel (``<extra_id_k>``, ``--vocab-extra-ids``) for the k-th
span in order of position:

* encoder input: the tokens with span k replaced by S_k (a [CLS]/[SEP] inside a span goes
  with it);
* decoder input: ``[BOS] S_0 span_0 S_1 span_1 ...``;
* labels: ``S_0 span_0 S_1 span_1 ... [EOS]`` (the decoder input shifted by one).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megalite.data.masked_dataset import (MaskedDataset, MaskedDatasetConfig,
                                          build_masked_datasets)
from megalite.errors import MegaliteError


@dataclass
class T5DatasetConfig(MaskedDatasetConfig):
    decoder_seq_length: int | None = None
    """Decoder tokens per sample (Megatron-LM's ``--decoder-seq-length``); ``seq_length`` is the
    encoder's (``--seq-length`` / ``--encoder-seq-length``)."""
    masking_max_ngram: int = 10

    def check(self) -> None:
        super().check()
        d = self.decoder_seq_length
        if isinstance(d, bool) or not isinstance(d, int) or d < 2:
            raise MegaliteError(f"--decoder-seq-length {d!r}: T5 data needs an integer >= 2")
        if not self.vocab.sentinels:
            raise MegaliteError("T5 data needs sentinel tokens: give --vocab-extra-ids N "
                                "(Megatron-LM's T5 runs use 100)")


class T5Dataset(MaskedDataset):
    """T5 samples (see the module docstring).

    Item: a dict of numpy arrays, megatron-core's fields (E = ``seq_length``, D =
    ``decoder_seq_length``):

    ``text_enc`` int64 [E]: encoder input, padding 0; ``text_dec`` int64 [D]: decoder input,
    padding 0; ``labels`` int64 [D]: decoder targets, padding -1; ``loss_mask`` int64 [D]: 1
    for the decoder's tokens; ``enc_mask`` int64 [E], ``dec_mask`` int64 [D]: 1 for a token, 0
    for padding; ``truncated`` int64 []. As in Megatron, a token equal to [PAD] counts as
    padding in the masks and reads 0 in ``text_enc``/``text_dec``/``labels``.
    """

    kind = "T5"

    def __init__(self, indexed, document_range, num_samples, config: T5DatasetConfig,
                 name: str = "train"):
        config.check()
        # [BOS] and [EOS] go to the decoder, so the encoder holds up to seq_length - 2 tokens of
        # sentences (Megatron's reservation).
        super().__init__(indexed, document_range, num_samples, config, name,
                         max_len=config.seq_length - 2, min_sentences=1)

    def _replacement(self, rng: np.random.RandomState) -> int | None:
        return self.vocab.mask  # no draw: the span goes whole to the decoder

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        rng, sentences, target = self._sample(i)
        v, c = self.vocab, self.config
        tokens = np.concatenate(sentences or [np.zeros(0, np.int64)]).astype(np.int64)
        truncated = len(tokens) > target
        tokens = tokens[:target]
        _, _, spans = self.mask(tokens, target, rng)
        if len(spans) > len(v.sentinels):
            raise MegaliteError(f"T5 sample {i} of the {self.name} split has {len(spans)} masked "
                                f"spans but --vocab-extra-ids gives {len(v.sentinels)} sentinels; "
                                "raise --vocab-extra-ids")
        encoder, decoder, start = [], [[v.bos]], 0
        for sentinel, span in zip(v.sentinels, spans):
            encoder += [tokens[start:span[0]], [sentinel]]
            decoder += [[sentinel], tokens[span]]
            start = int(span[-1]) + 1
        encoder.append(tokens[start:])
        encoder = np.concatenate(encoder).astype(np.int64)
        decoder_in = np.concatenate(decoder).astype(np.int64)
        decoder_out = np.concatenate([decoder_in[1:], [v.eos]]).astype(np.int64)
        nd = len(decoder_in)
        if nd > c.decoder_seq_length:
            raise MegaliteError(f"T5 sample {i} of the {self.name} split needs {nd} decoder "
                                f"tokens but --decoder-seq-length is {c.decoder_seq_length}; "
                                "raise it")

        def padded(values: np.ndarray, size: int, fill: int) -> np.ndarray:
            out = np.full(size, fill, dtype=np.int64)
            out[:len(values)] = values
            return out

        enc_mask = padded(encoder != v.pad, c.seq_length, 0)
        dec_mask = padded(decoder_in != v.pad, c.decoder_seq_length, 0)
        text_enc = padded(encoder, c.seq_length, 0)
        text_dec = padded(decoder_in, c.decoder_seq_length, 0)
        labels = padded(decoder_out, c.decoder_seq_length, -1)
        for array in (text_enc, text_dec, labels):
            array[array == v.pad] = 0
        loss_mask = padded(np.ones(nd, dtype=np.int64), c.decoder_seq_length, 0)
        return {"text_enc": text_enc, "text_dec": text_dec, "labels": labels,
                "loss_mask": loss_mask, "truncated": np.array(int(truncated), dtype=np.int64),
                "enc_mask": enc_mask, "dec_mask": dec_mask}


def build_t5_datasets(data_path: list[str], split: str, num_samples: tuple[int, int, int],
                      seq_length: int, seed: int, vocab, decoder_seq_length: int,
                      cache_dir: str | None = None, vocab_size: int | None = None,
                      blend_rule: str = "megalite", **options) -> tuple:
    """Train, valid and test :class:`T5Dataset` over ``data_path``, called like the GPT builder
    plus ``vocab`` (with sentinels: ``masked_lm_vocab(tokenizer, vocab_extra_ids)``) and
    ``decoder_seq_length``; ``seq_length`` is the encoder's. ``options``: masking settings of
    :class:`T5DatasetConfig`. None for a split with no samples."""
    config = T5DatasetConfig(seq_length=seq_length, vocab=vocab, seed=seed, cache_dir=cache_dir,
                             decoder_seq_length=decoder_seq_length, **options)
    config.check()
    return build_masked_datasets(T5Dataset, config, data_path, split, num_samples, vocab_size,
                                 blend_rule)


class MockT5Dataset:
    """``--mock-data`` for T5: item i is drawn by a generator seeded with ``(seed, i)``, no
    files needed. A random source of ``seq_length`` ids in ``[4, vocab_size)`` whose last
    quarter may be padding, ``mask_prob`` of its tokens replaced, in up to 4 spans, by the
    sentinels ``vocab_size - 1, vocab_size - 2, ...``; the decoder reads ``[BOS] S_0 span_0
    ...`` and predicts ``S_0 span_0 ... [EOS]``, padded to ``decoder_seq_length``. Ids 0-3
    stand for [PAD], [CLS], [BOS], [EOS]. The fields are :class:`T5Dataset`'s."""

    PAD, BOS, EOS = 0, 2, 3

    def __init__(self, vocab_size: int, seq_length: int, decoder_seq_length: int,
                 num_samples: int, seed: int, mask_prob: float = 0.15):
        if vocab_size <= 12 or seq_length < 8 or decoder_seq_length < 12:
            raise MegaliteError(f"mock T5 data needs --vocab-size > 12, --seq-length >= 8 and "
                                f"--decoder-seq-length >= 12, got {vocab_size}, {seq_length} "
                                f"and {decoder_seq_length}")
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.decoder_seq_length, self.num_samples = decoder_seq_length, num_samples
        self.seed, self.mask_prob = seed, mask_prob

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(i)])
        E, D = self.seq_length, self.decoder_seq_length
        n = E - int(rng.integers(0, E // 4 + 1))                # tokens before the padding
        tokens = rng.integers(4, self.vocab_size - 4, n, dtype=np.int64)
        # spans: up to 4 runs of masked positions, the decoder holding them all
        budget = max(1, min(int(round(n * self.mask_prob)), D - 9))
        starts = np.sort(rng.choice(n, size=min(4, budget), replace=False))
        encoder, decoder, end = [], [self.BOS], 0
        for k, start in enumerate(starts):
            if start < end:
                continue
            length = int(rng.integers(1, max(2, budget // len(starts) + 1)))
            stop = min(int(start) + length, n)
            sentinel = self.vocab_size - 1 - k
            encoder += list(tokens[end:start]) + [sentinel]
            decoder += [sentinel] + list(tokens[start:stop])
            end = stop
        encoder += list(tokens[end:])
        decoder_in = np.array(decoder[:D], dtype=np.int64)
        decoder_out = np.array((decoder[1:] + [self.EOS])[:D], dtype=np.int64)

        def padded(values, size: int, fill: int) -> np.ndarray:
            out = np.full(size, fill, dtype=np.int64)
            out[:len(values)] = values
            return out

        ne, nd = len(encoder), len(decoder_in)
        return {"text_enc": padded(encoder, E, 0), "text_dec": padded(decoder_in, D, 0),
                "labels": padded(decoder_out, D, -1),
                "loss_mask": padded(np.ones(nd, dtype=np.int64), D, 0),
                "truncated": np.array(0, dtype=np.int64),
                "enc_mask": padded(np.ones(ne, dtype=np.int64), E, 0),
                "dec_mask": padded(np.ones(nd, dtype=np.int64), D, 0)}
