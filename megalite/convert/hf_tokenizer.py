"""The run's tokenizer in Hugging Face form (``to-hf``) and back (``from-hf``).

``to-hf`` with a SentencePiece training tokenizer writes ``tokenizer.model`` (the model, as is)
and a ``tokenizer.json`` built here from the model's own settings, so that
``AutoTokenizer.from_pretrained(hf_dir)`` gives the ids ``sentencepiece`` gave in training:

* normalizer, in SentencePiece's order: the model's precompiled character map (NFKC etc.), then
  ``remove_extra_whitespaces`` (spaces only: strip both ends, collapse runs), the dummy prefix
  (``add_dummy_prefix``) and space -> ``▁`` (``escape_whitespaces``). No pre-tokenizer: like
  SentencePiece, the whole normalized text is one sequence to segment.
* model: BPE with merges ranked by the merged piece's score (SentencePiece merges the adjacent
  pair whose union has the best score; only normal pieces are ever formed), or Unigram with the
  pieces' scores; ``<unk>`` and byte fallback as the model has them.
* no post-processor: megalite never adds BOS/EOS inside a document (the end-of-document id is
  appended by preprocessing), so ``tok(text)`` is the training ids.

(transformers' LLaMA conversion ignores the model's normalizer: newlines, repeated spaces and
NFKC came out differently.) Control pieces (``<s>``, ``</s>``...) are named in
``tokenizer_config.json`` with ``split_special_tokens: true``: their text inside a document is
tokenized as text, as SentencePiece does, never turned into control ids.

Special ids (:class:`SpecialIds`, also written to config.json / generation_config.json): eos =
the end-of-document id megalite trained with; bos = the tokenizer's own bos if it has one, else
the eos (GPT-2's convention, and the id megalite ``generate`` starts an empty prompt with); pad =
the tokenizer's pad, or unset when it has none (padding with eos would make padded positions
look like document ends; HF ``generate`` then pads with eos by itself).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass

from megalite.errors import MegaliteError

__all__ = ["SpecialIds", "spm_to_tokenizers", "write_tokenizer_files", "import_tokenizer",
           "read_spm_settings"]

SPM_TYPES = (None, "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
_NORMAL, _USER_DEFINED = 1, 4


@dataclass
class SpecialIds:
    """Token ids and strings HF configs name (None: the tokenizer has no such token)."""

    eos: int | None = None
    bos: int | None = None
    pad: int | None = None
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None

    def config_fields(self) -> dict:
        return {"eos_token_id": self.eos, "bos_token_id": self.bos, "pad_token_id": self.pad}


# -- the SentencePiece model's settings (protobuf wire format, read directly) ------------------
def _fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while i < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            size = varint()
            if i + size > n:
                raise ValueError("truncated field")
            yield number, buf[i:i + size]
            i += size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, buf[i:i + size]
            i += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def read_spm_settings(model_file: str) -> dict:
    """The settings of a SentencePiece ``.model`` the HF pipeline needs (proto defaults where
    a field is absent): ``model_type`` (1 unigram, 2 bpe, 3 word, 4 char), ``byte_fallback``,
    ``treat_whitespace_as_suffix``, ``precompiled_charsmap``, ``add_dummy_prefix``,
    ``remove_extra_whitespaces``, ``escape_whitespaces``, and ``types``: each piece's type
    (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), by id.

    Parsed from the wire format here: the protobuf package is not a megalite dependency.
    """
    out = {"model_type": 1, "byte_fallback": False, "treat_whitespace_as_suffix": False,
           "precompiled_charsmap": b"", "add_dummy_prefix": True,
           "remove_extra_whitespaces": True, "escape_whitespaces": True, "types": []}
    trainer = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
    normalizer = {2: "precompiled_charsmap", 3: "add_dummy_prefix",
                  4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    try:
        with open(model_file, "rb") as f:
            data = f.read()
        for number, value in _fields(data):
            if number == 1:          # a piece: {1: text, 2: score, 3: type (default normal)}
                kind = [v for k, v in _fields(value) if k == 3]
                out["types"].append(int(kind[-1]) if kind else _NORMAL)
                continue
            table = {2: trainer, 3: normalizer}.get(number)
            if table is None:
                continue
            for sub, sub_value in _fields(value):
                if sub in table:
                    key = table[sub]
                    out[key] = sub_value if key == "precompiled_charsmap" else (
                        int(sub_value) if key == "model_type" else bool(sub_value))
    except (OSError, ValueError) as e:
        raise MegaliteError(f"{model_file}: not a readable SentencePiece model ({e})") from None
    return out


def spm_to_tokenizers(model_file: str):
    """A ``tokenizers.Tokenizer`` that encodes like ``SentencePieceProcessor(model_file)``
    (see the module docstring). MegaliteError for model types it cannot reproduce."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    s = read_spm_settings(model_file)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    if s["model_type"] not in (1, 2):
        raise MegaliteError(f"{model_file}: SentencePiece model type "
                            f"{ {3: 'word', 4: 'char'}.get(s['model_type'], s['model_type'])} "
                            f"has no exact tokenizers counterpart (bpe and unigram do)")
    if s["treat_whitespace_as_suffix"]:
        raise MegaliteError(f"{model_file}: treat_whitespace_as_suffix is not supported")
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    types = s["types"]
    if len(types) != n:
        raise MegaliteError(f"{model_file}: {len(types)} pieces in the file, sentencepiece "
                            f"reads {n}")
    if _USER_DEFINED in types:
        # SentencePiece emits user-defined pieces whole wherever they occur in the raw text;
        # the pipeline below would segment them like any text.
        print(f"warning: {model_file} has user-defined pieces; Hugging Face may tokenize text "
              f"containing them differently", file=sys.stderr)
    unk = sp.unk_id()
    if s["model_type"] == 2:
        vocab = {p: i for i, p in enumerate(pieces)}
        normal = [i for i in range(n) if types[i] == _NORMAL]
        ranked = []
        for i in normal:
            p = pieces[i]
            for k in range(1, len(p)):
                if p[:k] in vocab and p[k:] in vocab:
                    ranked.append((-sp.get_score(i), i, p[:k], p[k:]))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk] if unk >= 0 else None,
                           fuse_unk=True, byte_fallback=s["byte_fallback"])
    else:
        # Only normal pieces take part in SentencePiece's segmentation: the others get a score
        # far below every normal piece, so no path through them ever wins.
        floor = min(sp.get_score(i) for i in range(n) if types[i] == _NORMAL) - 1e6
        model = models.Unigram([(p, sp.get_score(i) if types[i] == _NORMAL else floor)
                                for i, p in enumerate(pieces)], unk if unk >= 0 else None,
                               s["byte_fallback"])
    tok = Tokenizer(model)
    steps = []
    if s["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(s["precompiled_charsmap"]))
    if s["remove_extra_whitespaces"]:
        # \A and \z: Oniguruma's ^ and $ would also match at newlines.
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if s["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))      # Prepend leaves an empty text empty
    if s["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if unk >= 0:      # SentencePiece's surface for an unknown piece
        dec.insert(0, decoders.Replace(pieces[unk], " \u2047 "))
    if s["add_dummy_prefix"]:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _spm_specials(model_file: str) -> SpecialIds:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_file)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None
    eos = sp.eos_id()
    if eos < 0:
        raise MegaliteError(f"{model_file}: the SentencePiece model has no eos piece")
    bos = sp.bos_id() if sp.bos_id() >= 0 else eos
    pad = sp.pad_id() if sp.pad_id() >= 0 else None
    return SpecialIds(eos=eos, bos=bos, pad=pad, eos_token=piece(eos), bos_token=piece(bos),
                      pad_token=piece(pad) if pad is not None else None,
                      unk_token=piece(sp.unk_id()))


# -- megalite -> Hugging Face -----------------------------------------------------------------
def write_tokenizer_files(tokenizer_model: str | None, tokenizer_type: str | None,
                          directory: str, max_length: int | None = None,
                          vocab_file: str | None = None
                          ) -> tuple[list[str], SpecialIds | None]:
    """The run's tokenizer files into ``directory``; returns (files written, special ids).

    SentencePiece: ``tokenizer.model`` (as is), ``tokenizer.json`` (:func:`spm_to_tokenizers`)
    and ``tokenizer_config.json``. ``HuggingFaceTokenizer``: its ``tokenizer.json`` and the
    ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it, the config completed with
    the eos megalite used and ``split_special_tokens``. BERT's WordPiece (``vocab_file``):
    ``vocab.txt`` and a ``tokenizer_config.json`` for ``BertTokenizer`` (lower-casing as the
    type says). ([], None) for other tokenizers or when the file is gone (a warning; the
    weights are still converted).
    """
    if tokenizer_type == "HuggingFaceTokenizer" and tokenizer_model:
        return _copy_hf_tokenizer(tokenizer_model, directory, max_length)
    if tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        return _write_wordpiece(vocab_file, tokenizer_type, directory, max_length)
    if not tokenizer_model or not tokenizer_model.endswith(".model") \
            or tokenizer_type not in SPM_TYPES:
        return [], None
    if not os.path.isfile(tokenizer_model):
        print(f"warning: tokenizer {tokenizer_model} not found; no tokenizer files written",
              file=sys.stderr)
        return [], None
    shutil.copyfile(tokenizer_model, os.path.join(directory, "tokenizer.model"))
    ids = _spm_specials(tokenizer_model)
    try:
        spm_to_tokenizers(tokenizer_model).save(os.path.join(directory, "tokenizer.json"))
    except MegaliteError as e:    # keep the weights: tokenizer.model alone still loads in spm
        print(f"warning: no tokenizer.json written ({e}); tokenizer.model copied as is",
              file=sys.stderr)
        return ["tokenizer.model"], ids
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": ids.bos_token,
              "eos_token": ids.eos_token, "unk_token": ids.unk_token,
              "pad_token": ids.pad_token, "add_bos_token": False, "add_eos_token": False,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    if max_length:
        config["model_max_length"] = max_length
    _write_json(os.path.join(directory, "tokenizer_config.json"),
                {k: v for k, v in config.items() if v is not None})
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json"], ids


def _write_wordpiece(vocab_file: str | None, tokenizer_type: str, directory: str,
                     max_length: int | None) -> tuple[list[str], SpecialIds | None]:
    if not vocab_file or not os.path.isfile(vocab_file):
        print(f"warning: vocab file {vocab_file} not found; no tokenizer files written",
              file=sys.stderr)
        return [], None
    from tokenizers import models
    vocab = models.WordPiece.read_file(vocab_file)
    shutil.copyfile(vocab_file, os.path.join(directory, "vocab.txt"))
    config = {"tokenizer_class": "BertTokenizer",
              "do_lower_case": tokenizer_type == "BertWordPieceLowerCase",
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
              "cls_token": "[CLS]", "mask_token": "[MASK]"}
    if max_length:
        config["model_max_length"] = max_length
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    pad = vocab.get("[PAD]")      # BERT configs name only the pad id
    return ["vocab.txt", "tokenizer_config.json"], SpecialIds(
        pad=pad, pad_token="[PAD]" if pad is not None else None)


def _copy_hf_tokenizer(tokenizer_model: str, directory: str, max_length: int | None
                       ) -> tuple[list[str], SpecialIds | None]:
    from megalite.data.tokenizers import HuggingFaceTokenizer
    main = tokenizer_model if os.path.isfile(tokenizer_model) \
        else os.path.join(tokenizer_model, "tokenizer.json")
    if not os.path.isfile(main):
        print(f"warning: tokenizer {main} not found; no tokenizer files written",
              file=sys.stderr)
        return [], None
    source = os.path.dirname(main)
    ours = HuggingFaceTokenizer(main)             # the eos megalite trained with
    shutil.copyfile(main, os.path.join(directory, "tokenizer.json"))
    written = ["tokenizer.json", "tokenizer_config.json"]
    if os.path.isfile(os.path.join(source, "special_tokens_map.json")):
        shutil.copyfile(os.path.join(source, "special_tokens_map.json"),
                        os.path.join(directory, "special_tokens_map.json"))
        written.append("special_tokens_map.json")
    cfg_file = os.path.join(source, "tokenizer_config.json")
    config = {}
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise MegaliteError(f"{cfg_file}: cannot read ({e})") from None
        if not isinstance(config, dict):
            raise MegaliteError(f"{cfg_file}: expected a JSON object")
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    eos_token = ours._tok.id_to_token(ours.eod)
    config["eos_token"] = eos_token
    config["split_special_tokens"] = True        # document text never becomes control ids
    bos_token = _token_name(config.get("bos_token")) or eos_token
    config.setdefault("bos_token", bos_token)
    if max_length and "model_max_length" not in config:
        config["model_max_length"] = max_length
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    pad_token = _token_name(config.get("pad_token"))
    bos = ours._tok.token_to_id(bos_token)
    pad = ours._tok.token_to_id(pad_token) if pad_token else None
    return written, SpecialIds(eos=ours.eod, bos=bos if bos is not None else ours.eod, pad=pad,
                               eos_token=eos_token, bos_token=bos_token, pad_token=pad_token)


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# -- Hugging Face -> megalite -----------------------------------------------------------------
_IMPORTS = {   # HF file -> (megalite tokenizer type, the files copied with it, config field)
    "tokenizer.model": ("SentencePieceTokenizer", ("tokenizer.model",), "tokenizer_model"),
    "spiece.model": ("SentencePieceTokenizer", ("spiece.model",), "tokenizer_model"),   # T5's
    "tokenizer.json": ("HuggingFaceTokenizer", ("tokenizer.json", "tokenizer_config.json",
                                               "special_tokens_map.json"), "tokenizer_model"),
    "vocab.txt": ("BertWordPiece", ("vocab.txt", "tokenizer_config.json",
                                    "special_tokens_map.json"), "vocab_file"),
}


def _wordpiece_type(hf_dir: str) -> str:
    """BertWordPieceLowerCase unless the directory's tokenizer_config.json says
    ``do_lower_case: false`` (Hugging Face's BertTokenizer lower-cases by default)."""
    path = os.path.join(hf_dir, "tokenizer_config.json")
    lower = True
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                lower = bool(json.load(f).get("do_lower_case", True))
        except (OSError, ValueError, AttributeError) as e:
            raise MegaliteError(f"{path}: cannot read ({e})") from None
    return "BertWordPieceLowerCase" if lower else "BertWordPieceCase"


def import_tokenizer(hf_dir: str, dest: str, final_dest: str, vocab_size: int,
                     files: tuple[str, ...] = ("tokenizer.model", "tokenizer.json")):
    """Copy an HF directory's tokenizer into ``dest`` (a temporary path that becomes
    ``final_dest``) for a from-hf checkpoint; returns ``(tokenizer, fields)``: the megalite
    tokenizer and the data-section fields naming it for config.json (``tokenizer_type`` and
    ``tokenizer_model`` or ``vocab_file``, the path under ``final_dest``), or ``(None, {})``
    when there is none usable.

    ``files``: the candidates in order of preference, the model family's (its converter's
    ``TOKENIZER_FILES``). GPT: ``tokenizer.model`` (SentencePiece; the model HF's
    ``tokenizer.json`` of such directories was converted from), then ``tokenizer.json`` (with
    the ``tokenizer_config.json`` beside it, which names the eos). BERT: ``vocab.txt``
    (WordPiece, lower-cased unless ``tokenizer_config.json`` says ``do_lower_case: false``),
    what its data needs.
    """
    from megalite.data.tokenizers import build_tokenizer
    for first in files:
        kind, names, field = _IMPORTS[first]
        src = os.path.join(hf_dir, first)
        if not os.path.isfile(src):
            continue
        try:
            if kind == "BertWordPiece":
                kind = _wordpiece_type(hf_dir)
                tok = build_tokenizer(kind, vocab_file=src)
            else:
                tok = build_tokenizer(kind, src)
        except MegaliteError as e:
            print(f"warning: {src} is not usable as the megalite tokenizer ({e})",
                  file=sys.stderr)
            continue
        if tok.vocab_size > vocab_size:
            print(f"warning: {src} has {tok.vocab_size} tokens, more than the model's "
                  f"vocab_size {vocab_size}; not recorded as the checkpoint's tokenizer",
                  file=sys.stderr)
            continue
        os.makedirs(dest, exist_ok=True)
        for name in names:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(dest, name))
        return tok, {"tokenizer_type": kind, field: os.path.join(final_dest, first)}
    return None, {}
