"""Benchmark: the BERT/T5 sample index, megalite (C++) vs megatron-core's ``helpers.build_mapping``.

Both build the sample index of a sentence-split file (rows of first sentence, end sentence,
target length, shuffled) with the same seed, lengths and sample count, as
``BERTDataset``/``T5Dataset`` and megatron-core's ``BERTMaskedWordPieceDataset`` /
``T5MaskedWordPieceDataset`` call them; the script checks the arrays are identical. Timed
alternately in one process, ``--repeat`` rounds; the figure is megalite's best time /
megatron-core's best time (and the ratio per round), in wall time and in CPU time (both run on
one thread, so CPU time is their work, less disturbed by other processes).

The builders read only the ``.idx`` arrays (sentence lengths, document boundaries), so the file
is synthetic: sentence lengths uniform in [1, 2 * mean - 1] with one in 10,000 over 512 tokens
(those documents are skipped), documents of 0 to 2 * mean - 1 sentences (so some are empty or
have one sentence). ``--epochs`` epochs' worth of samples are asked (at the full target length).

``--items N`` also times N dataset items (masking, in Python with numpy's RandomState, as
Megatron's) of megalite's and megatron-core's datasets on the built-in corpus sentence-split with
a WordPiece vocab trained on it (built in a temporary directory first), checking every field equal.
Prints one JSON object, e.g.::

    python benchmarks/masked_sample_index.py                 # 1B tokens, BERT and T5 shapes
    python benchmarks/masked_sample_index.py --items 2000 --tokens 1e8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

from megalite import _C

# The datasets' sample index shapes: (max_len, min_sentences) from the sequence length.
SHAPES = {"bert": lambda seq: (seq - 3, 2), "t5": lambda seq: (seq - 2, 1)}


def synthetic(tokens: float, mean_sentence: int, mean_sentences: int, seed: int):
    """(document starts int64 [D + 1], sentence lengths int32 [S]) of about ``tokens`` tokens."""
    rng = np.random.default_rng(seed)
    count = int(tokens / mean_sentence)
    sizes = rng.integers(1, 2 * mean_sentence, count, dtype=np.int32)
    sizes[rng.random(count) < 1e-4] = 600
    per_doc = rng.integers(0, 2 * mean_sentences, count // mean_sentences + 1)
    starts = np.concatenate([[0], np.cumsum(per_doc)])
    starts = starts[starts <= count]
    starts[-1] = count
    return starts.astype(np.int64), sizes


def time_index(starts, sizes, kind, seq_length, samples, seed, repeat):
    from megatron.core.datasets import helpers

    max_len, min_sentences = SHAPES[kind](seq_length)
    ours_t, theirs_t, ours_cpu, theirs_cpu, same = [], [], [], [], True
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        ours, stats = _C.build_masked_sample_index(starts, sizes, samples, max_len, 0.1, seed,
                                                   min_sentences)
        ours_t.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        # What MaskedWordPieceDataset passes: "all the epochs it takes", the same sample count.
        theirs = helpers.build_mapping(starts, sizes, np.iinfo(np.int32).max - 1, samples,
                                       max_len, 0.1, seed, False, min_sentences)
        theirs_t.append(time.perf_counter() - t0)
        theirs_cpu.append(time.process_time() - c0)
        same = same and bool(np.array_equal(ours, theirs))
        rows = len(ours)
        del ours, theirs
    return {"samples_asked": samples, "rows": rows,
            "document_stats": dict(zip(
                ("documents", "empty", "one_sentence", "long_sentence", "skipped_too_few",
                 "skipped_long", "epochs"), (int(x) for x in stats))),
            "megalite_s": [round(t, 4) for t in ours_t],
            "megatron_core_s": [round(t, 4) for t in theirs_t],
            "ratio_best": round(min(ours_t) / min(theirs_t), 3),
            "ratio_per_round": [round(a / b, 3) for a, b in zip(ours_t, theirs_t)],
            # Both are one thread: CPU time is the work, less disturbed by a busy machine.
            "megalite_cpu_s": [round(t, 4) for t in ours_cpu],
            "megatron_core_cpu_s": [round(t, 4) for t in theirs_cpu],
            "cpu_ratio_best": round(min(ours_cpu) / min(theirs_cpu), 3),
            "identical": same}


def time_items(count: int, seed: int) -> dict:
    """Per-item time of megalite's and megatron-core's BERT and T5 datasets on the built-in
    corpus (the first ``count`` items of each train split, every field compared)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "tests"))
    import torch.distributed as dist
    from masked_reference import megatron_masked_datasets
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from megalite.data.bert_dataset import build_bert_datasets
    from megalite.data.builtin_corpus import write_builtin_corpus
    from megalite.data.masked_dataset import masked_lm_vocab
    from megalite.data.t5_dataset import build_t5_datasets
    from megalite.data.tokenizers import build_tokenizer
    from megalite.dataprep import preprocess_data

    tmp = tempfile.mkdtemp(prefix="masked-bench-")
    corpus = os.path.join(tmp, "corpus.jsonl")
    write_builtin_corpus(corpus)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=8000, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    (vocab_file,) = wp.model.save(tmp)
    prefix = os.path.join(tmp, "corpus")
    assert preprocess_data.main(["--input", corpus, "--output-prefix", prefix, "--tokenizer-type",
                                 "BertWordPieceLowerCase", "--vocab-file", vocab_file,
                                 "--split-sentences", "--workers", "1",
                                 "--log-interval", "100000000"]) == 0
    prefix += "_text_sentence"
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=vocab_file)
    vocab = masked_lm_vocab(tokenizer, 100)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    result = {}
    sizes = (count, 0, 0)
    for kind in ("bert", "t5"):
        if kind == "bert":
            ours = build_bert_datasets([prefix], "1", sizes, 512, seed, vocab,
                                       cache_dir=os.path.join(tmp, "o"))[0]
        else:
            ours = build_t5_datasets([prefix], "1", sizes, 512, seed, vocab, 128,
                                     cache_dir=os.path.join(tmp, "o"))[0]
        theirs = megatron_masked_datasets(kind, tokenizer, [prefix], None, "1", sizes, 512, seed,
                                          os.path.join(tmp, "m"), vocab_extra_ids=100,
                                          decoder_seq_length=128)[0]
        ours_t = theirs_t = 0.0
        same = True
        for i in range(count):
            t0 = time.perf_counter()
            a = ours[i]
            t1 = time.perf_counter()
            b = theirs[i]
            t2 = time.perf_counter()
            ours_t, theirs_t = ours_t + t1 - t0, theirs_t + t2 - t1
            same = same and all(np.array_equal(a[k], b[k]) for k in b)
        result[kind] = {"items": count, "megalite_us_per_item": round(ours_t / count * 1e6, 1),
                        "megatron_core_us_per_item": round(theirs_t / count * 1e6, 1),
                        "ratio": round(ours_t / theirs_t, 3), "identical": same}
    dist.destroy_process_group()
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--mean-sentence", type=int, default=24, help="mean sentence length")
    p.add_argument("--mean-sentences", type=int, default=20, help="mean sentences per document")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--epochs", type=float, default=3.0,
                   help="epochs' worth of samples asked (tokens / target length each)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--items", type=int, default=0, help="also time this many dataset items")
    args = p.parse_args()
    warnings.simplefilter("ignore")

    t0 = time.perf_counter()
    starts, sizes = synthetic(args.tokens, args.mean_sentence, args.mean_sentences, args.seed)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_average": [round(x, 2) for x in os.getloadavg()]},
           "file": {"tokens": int(sizes.sum(dtype=np.int64)), "sentences": len(sizes),
                    "documents": len(starts) - 1,
                    "synthesis_s": round(time.perf_counter() - t0, 2)}}
    for kind in ("bert", "t5"):
        samples = int(args.epochs * out["file"]["tokens"] / SHAPES[kind](args.seq_length)[0])
        out[kind] = time_index(starts, sizes, kind, args.seq_length, samples, args.seed,
                               args.repeat)
    if args.items:
        out["items"] = time_items(args.items, args.seed)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
