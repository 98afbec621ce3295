"""megatron-core's BERT and T5 datasets as the reference for megalite's (tests only).

``MegatronBertTokenizer`` gives megatron-core's masked datasets what they read of Megatron-LM's
``BertWordPieceLowerCase`` tokenizer, over the vocab.txt a megalite ``BertWordPieceTokenizer``
reads: the vocab in file order (Megatron-LM's ``load_vocab``: one stripped token per line), then
``[BOS]``, ``[EOS]`` and ``<extra_id_0..N-1>`` appended unless present, ``cls``/``sep``/
``pad``/``mask``/``bos``/``eos``, ``inv_vocab`` and ``additional_special_tokens_ids``.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

with warnings.catch_warnings():  # megatron-core warns that Apex / Transformer Engine are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets.bert_dataset import (BERTMaskedWordPieceDataset,
                                                     BERTMaskedWordPieceDatasetConfig)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
    from megatron.core.datasets.t5_dataset import (T5MaskedWordPieceDataset,
                                                   T5MaskedWordPieceDatasetConfig)

# megalite's MaskedDatasetConfig defaults are Megatron-LM's pretrain_bert.py settings.
MEGATRON_BERT_MASKING = dict(masking_probability=0.15, short_sequence_probability=0.1,
                             masking_max_ngram=3, masking_do_full_word=True,
                             masking_use_longer_ngrams=False,
                             masking_use_geometric_distribution=True)


class MegatronBertTokenizer(MegatronLegacyTokenizer):
    def __init__(self, tokenizer, vocab_extra_ids: int = 0):
        super().__init__(tokenizer.vocab_file, vocab_extra_ids=vocab_extra_ids)
        self._vocab = OrderedDict()
        with open(tokenizer.vocab_file, encoding="utf-8") as f:
            for index, line in enumerate(f):
                self._vocab[line.strip()] = index
        assert len(self._vocab) == tokenizer.vocab_size  # megalite reads the same vocab
        extra = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for token in ["[BOS]", "[EOS]"] + extra:
            if token not in self._vocab:
                self._vocab[token] = len(self._vocab)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        self.additional_special_tokens_ids = [self._vocab[t] for t in extra]

    def tokenize(self, text):
        raise NotImplementedError("the data is tokenized already")

    vocab = property(lambda self: self._vocab)
    inv_vocab = property(lambda self: self._inv_vocab)
    vocab_size = property(lambda self: len(self._vocab))
    cls = property(lambda self: self._vocab["[CLS]"])
    sep = property(lambda self: self._vocab["[SEP]"])
    pad = property(lambda self: self._vocab["[PAD]"])
    mask = property(lambda self: self._vocab["[MASK]"])
    bos = property(lambda self: self._vocab["[BOS]"])
    eos = property(lambda self: self._vocab["[EOS]"])
    eod = eos


def megatron_masked_datasets(kind, tokenizer, prefixes, weights, split, sizes, seq_length, seed,
                             cache, vocab_extra_ids=0, decoder_seq_length=None, **masking):
    """megatron-core's BERT (``kind="bert"``; ``classification_head`` in ``masking``) or T5
    train/valid/test datasets."""
    options = dict(MEGATRON_BERT_MASKING, **masking)
    config_class, dataset_class = {
        "bert": (BERTMaskedWordPieceDatasetConfig, BERTMaskedWordPieceDataset),
        "t5": (T5MaskedWordPieceDatasetConfig, T5MaskedWordPieceDataset)}[kind]
    if kind == "bert":
        options.setdefault("classification_head", True)
    if kind == "t5":
        options["sequence_length_decoder"] = decoder_seq_length
        if "masking_max_ngram" not in masking:
            options["masking_max_ngram"] = 10
    config = config_class(
        random_seed=seed, sequence_length=seq_length, blend=(list(prefixes), weights),
        split=split, path_to_cache=str(cache), masking_do_permutation=False,
        tokenizer=MegatronBertTokenizer(tokenizer, vocab_extra_ids), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(dataset_class, list(sizes), lambda: True,
                                             config).build()


def megalite_train_splits(prefix, vocab, samples, seq_length, seed, decoder_seq_length, cache):
    """megalite's BERT and T5 train datasets over the whole of ``prefix`` (split "1")."""
    from megalite.data.bert_dataset import build_bert_datasets
    from megalite.data.t5_dataset import build_t5_datasets

    sizes = (samples, 0, 0)
    bert = build_bert_datasets([prefix], "1", sizes, seq_length, seed, vocab, cache_dir=str(cache))
    t5 = build_t5_datasets([prefix], "1", sizes, seq_length, seed, vocab, decoder_seq_length,
                           cache_dir=str(cache))
    return bert[0], t5[0]
