"""Sentence splitters for ``--split-sentences``: quality and speed (prints one JSON object).

Candidates (PyPI packages that split without downloading anything at run time): ``nupunkt``
(Punkt, the algorithm of Megatron-LM's NLTK splitter, with a bundled English model),
``blingfire`` (finite-state machine, language-independent), ``pysbd`` (rules per language) and
``sentencex`` (rules per language with fallbacks, Rust core).

1. ``quality``: boundary precision / recall / F1 and the share of paragraphs split exactly right,
   on the hand-checked English and Chinese paragraphs below (written for this benchmark; ``|``
   marks where a sentence starts). A boundary is the position of a sentence's first
   non-whitespace character; whitespace-only pieces are ignored. ``pysbd`` and ``sentencex`` are
   told each paragraph's language (their best case).
2. ``speed``: characters per second of each splitter alone (one thread, best of ``--repeats``; for
   sentencex both megalite's splitter and the bare ``sentencex.segment``) on
   English (the built-in corpus: pydoc topics and standard-library docstrings) and on Chinese (the
   Chinese paragraphs below repeated), reported also as a ratio to the fastest.
3. ``preprocess``: ``megalite preprocess --split-sentences`` against the same run without it
   (the built-in corpus ``--copies`` times, SentencePiece BPE 8,000 trained on it, 1 worker,
   ``--append-eod``), as a wall-time ratio; and ``builder_calls``: the parent's cost of writing
   sentence-split documents one builder call per document.

    python benchmarks/sentence_splitters.py            # needs: pip install nupunkt blingfire pysbd sentencex
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# English paragraphs: abbreviations, initials, decimals, versions, URLs, quotes, ellipses,
# parentheses, numbered lists and headings on lines of their own.
ENGLISH = [
    "Dr. Watson met Mrs. Hudson at 221B Baker St. in London. |They talked for an hour. |Then he "
    "left at 5 p.m. and walked home.",
    "The U.S. economy grew by 2.5% in 2023. |Analysts at J.P. Morgan had expected less. "
    "|\"Growth was strong,\" one of them said. |\"Will it last?\" |Nobody knows.",
    "Use os.path.join() to build paths, e.g. os.path.join('a', 'b'). |The function returns a "
    "str. |See also pathlib.Path, i.e. the object-oriented API.",
    "Wait... what was that? |It sounded like thunder! |Or maybe a truck (a big one). |We never "
    "found out.",
    "Installation takes three steps.\n|1. Download the archive.\n|2. Unpack it.\n|3. Run the "
    "installer.",
    "Version 3.11.7 was released in December. |Download it from https://www.python.org/downloads/ "
    "and verify the checksum. |Questions go to help@example.org.",
    "The Lord of the Rings was written by J. R. R. Tolkien. |It was first published in 1954. "
    "|Frodo is its hero, not Mr. Baggins the elder.",
    "Introduction\n\n|This chapter explains the basics. |It assumes no prior knowledge of the "
    "subject.",
    "She asked, \"Are you coming?\" and waited at the door. |He did not answer. |After a while "
    "she left (without him).",
    "(This step is optional.) |The main step follows. |It takes approx. 10 min. on a laptop.",
    "Return the number of items in a container. |The argument may be a sequence (such as a "
    "string, bytes, tuple, list, or range) or a collection. |Raises TypeError otherwise.",
    "Fig. 3 shows the results. |The error fell from 4.5 to 1.2 vs. the baseline. |See Sec. 4 for "
    "details.",
]

# Chinese paragraphs: 。！？ and ……, quotes “”, book titles, full-width parentheses, decimals,
# semicolons (not boundaries), an exclamation inside a quote that the sentence continues past,
# embedded English with abbreviations, and a heading on a line of its own.
CHINESE = [
    "今天天气很好。|我们去公园散步吧！|你觉得怎么样？|他说：“好的。”|然后我们出发了。",
    "这台电脑的价格是3999.99元。|它的内存有16GB，硬盘有1TB。|你想买吗？",
    "他想了很久……|最后还是决定留下来。|“我不走了！”他大声说。",
    "Python 3.11 发布于2022年10月。|它比 Python 3.10 快了大约25%。|更多信息请见 docs.python.org 网站。",
    "第一步，下载安装包；第二步，解压文件；第三步，运行安装程序。|安装完成后请重启电脑。",
    "老师问：“谁知道答案？”|教室里一片安静。|过了一会儿，小明举起了手！|“我知道！”",
    "第一章 开始\n\n|很久很久以前，有一座山。|山里有一座庙。",
    "张先生（Mr. Zhang）今天来了。|他带来了一本书，书名是《百年孤独》。|我们聊了很久。",
    "数据集包含1.5亿个词。|训练用了三天？|不，是四天。",
    "“你好吗？”她问。|“很好，谢谢！”我回答。",
]


def paragraphs(marked: list[str]) -> list[tuple[str, set[int]]]:
    """``(text, gold boundary offsets)`` for each ``|``-marked paragraph."""
    out = []
    for m in marked:
        parts = m.split("|")
        gold, pos = set(), 0
        for part in parts[:-1]:
            pos += len(part)
            gold.add(pos)
        out.append(("".join(parts), gold))
    return out


def splitters(lang_of_text: str) -> dict:
    """name -> ``f(text) -> [(start, end)]`` character spans (ISO language for the rule-based ones).

    ``sentencex`` is megalite's :class:`SentenceSplitter` (sentencex plus locating its pieces in
    the text, which sentencex's own pieces do not always tile); ``sentencex_raw`` (speed only) is
    the bare ``sentencex.segment``."""
    import blingfire
    import nupunkt
    import pysbd
    import sentencex

    from megalite.dataprep.sentences import SentenceSplitter

    seg = pysbd.Segmenter(language=lang_of_text, clean=False, char_span=True)
    return {
        "nupunkt": nupunkt.sent_spans,
        "blingfire": lambda text: blingfire.text_to_sentences_and_offsets(text)[1],
        "pysbd": lambda text: [(s.start, s.end) for s in seg.segment(text)],
        "sentencex": SentenceSplitter(lang_of_text).spans,
        "sentencex_raw": lambda text: list(sentencex.segment(lang_of_text, text)),
    }


def boundaries(text: str, spans) -> set[int]:
    starts = set()
    for start, end in spans:
        piece = text[start:end]
        if piece.strip():
            starts.add(start + len(piece) - len(piece.lstrip()))
    first = len(text) - len(text.lstrip())
    return starts - {first}


def quality(lang: str, marked: list[str]) -> dict:
    out = {}
    for name, split in splitters(lang).items():
        if name == "sentencex_raw":
            continue
        tp = fp = fn = exact = 0
        for text, gold in paragraphs(marked):
            got = boundaries(text, split(text))
            tp, fp, fn = tp + len(got & gold), fp + len(got - gold), fn + len(gold - got)
            exact += got == gold
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out[name] = {"precision": round(p, 3), "recall": round(r, 3),
                     "f1": round(2 * p * r / max(p + r, 1e-9), 3),
                     "paragraphs_exact": f"{exact}/{len(marked)}", "wrong_boundaries": fp + fn}
    return out


def speed(lang: str, texts: list[str], repeats: int) -> dict:
    out = {}
    for name, split in splitters(lang).items():
        best = float("inf")
        for r in range(repeats):
            # A distinct first line per text and run: nupunkt caches its results per paragraph.
            unique = [f"{name} {r}-{i}\n\n{text}" for i, text in enumerate(texts)]
            chars = sum(map(len, unique))
            t0 = time.perf_counter()
            for text in unique:
                split(text)
            best = min(best, time.perf_counter() - t0)
        out[name] = {"chars_per_s": round(chars / best)}
    fastest = max(v["chars_per_s"] for v in out.values())
    for v in out.values():
        v["vs_fastest"] = round(v["chars_per_s"] / fastest, 4)
    return {"chars": chars, "documents": len(texts), "splitters": out}


def preprocess_cost(workdir: str, repeats: int, copies: int) -> dict:
    """Wall time of ``megalite preprocess`` with ``--split-sentences`` over without (same input:
    the built-in corpus ``copies`` times)."""
    from megalite.data.builtin_corpus import write_builtin_corpus
    from megalite.dataprep import preprocess_data, train_tokenizer

    one = os.path.join(workdir, "builtin.jsonl")
    write_builtin_corpus(one)
    corpus = os.path.join(workdir, "input.jsonl")
    with open(one, "rb") as src, open(corpus, "wb") as dst:
        dst.write(src.read() * copies)
    prefix = os.path.join(workdir, "sp")
    train_tokenizer.main(["--input", one, "--output-prefix", prefix, "--vocab-size", "8000",
                          "--model-type", "bpe", "--character-coverage", "1.0"])
    out = {}
    for label, extra in (("plain", []), ("split_sentences", ["--split-sentences"])):
        best, summary = float("inf"), None
        for _ in range(repeats):
            args = preprocess_data.build_parser().parse_args(
                ["--input", corpus, "--output-prefix", os.path.join(workdir, label),
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                 prefix + ".model", "--append-eod", "--workers", "1", "--log-interval", "1000000"]
                + extra)
            summary = preprocess_data.preprocess(args)
            best = min(best, summary["seconds"])
        out[label] = {"seconds": round(best, 3), "documents": summary["documents"],
                      "sequences": summary["sequences"], "tokens": summary["tokens"],
                      "input_bytes": summary["input_bytes"]}
    out["split_over_plain_time"] = round(out["split_sentences"]["seconds"] / out["plain"]["seconds"], 3)
    return out


def builder_calls(workdir: str, documents: int = 100_000) -> dict:
    """What the parent spends writing sentence-split documents (one builder call per document)
    against the same tokens written as one-sequence documents in one call: synthetic documents
    of 1-19 sentences of 1-39 tokens."""
    import numpy as np

    from megalite.data.indexed import IndexedDatasetBuilder
    from megalite.dataprep.sentences import add_sentence_documents

    rng = np.random.default_rng(0)
    per_doc = rng.integers(1, 20, documents).astype(np.int64)
    lengths = rng.integers(1, 40, int(per_doc.sum())).astype(np.int64)
    tokens = rng.integers(0, 1000, int(lengths.sum())).astype(np.uint16)
    document_lengths = np.add.reduceat(lengths, np.cumsum(per_doc) - per_doc)
    with IndexedDatasetBuilder(os.path.join(workdir, "a"), np.uint16) as a, \
            IndexedDatasetBuilder(os.path.join(workdir, "b"), np.uint16) as b:
        t0 = time.perf_counter()
        add_sentence_documents(a, tokens, lengths, per_doc)
        t1 = time.perf_counter()
        b.add_documents(tokens, document_lengths)
        t2 = time.perf_counter()
        a.abort()
        b.abort()
    return {"documents": documents, "sentences": int(lengths.size), "tokens": int(tokens.size),
            "per_document_calls_s": round(t1 - t0, 4), "one_call_s": round(t2 - t1, 4),
            "us_per_document": round((t1 - t0) / documents * 1e6, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    p.add_argument("--chinese-copies", type=int, default=2000,
                   help="how many times the Chinese paragraphs are repeated for the speed figure")
    p.add_argument("--copies", type=int, default=4,
                   help="how many times the built-in corpus is repeated for the preprocess figure")
    p.add_argument("--no-preprocess", action="store_true", help="skip the preprocess cost figure")
    args = p.parse_args(argv)
    from megalite.data.builtin_corpus import iter_builtin_texts

    english_texts = list(iter_builtin_texts())
    chinese_texts = ["".join(t for t, _ in paragraphs(CHINESE))] * args.chinese_copies
    result = {
        "quality": {"english": quality("en", ENGLISH), "chinese": quality("zh", CHINESE),
                    "boundaries": {"english": sum(m.count("|") for m in ENGLISH),
                                   "chinese": sum(m.count("|") for m in CHINESE)}},
        "speed": {"english": speed("en", english_texts, args.repeats),
                  "chinese": speed("zh", chinese_texts, args.repeats)},
        "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    if not args.no_preprocess:
        with tempfile.TemporaryDirectory() as workdir:
            result["preprocess"] = preprocess_cost(workdir, args.repeats, args.copies)
            result["builder_calls"] = builder_calls(workdir)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
