"""The tokenizer travels with conversions: ``to-hf`` exports the training tokenizer exactly,
``from-hf`` checkpoints name the full model shape and their tokenizer, ``reshard`` fits the
quickstart's model shape as the README shows it, and ``--help`` says what the options do.

Token ids are compared exactly (integers: no tolerance) on every document of the built-in
corpus, with the ``sp_model`` fixture and with a model trained with the quickstart's own
tokenizer settings (:func:`megalite.quickstart.tokenizer_args`: byte fallback, vocab 2000).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megalite.cli import main as megalite_main  # noqa: E402

QUICKSTART_YAML = Path(__file__).resolve().parents[2] / "megalite" / "configs" / "quickstart.yaml"
# Text SentencePiece's normalizer treats specially: space runs at both ends and inside,
# newlines next to spaces, tabs, full-width characters (NFKC), control-piece text, characters
# outside the vocabulary (unknown, or bytes with byte fallback), a literal "▁", no text at all.
EDGE_TEXTS = ["  lead and trail  ", "a    b\n\n  c\t\td", "a  \nb", "a\n  b", "\n\n", "", " ",
              "ｆｕｌｌ　ｗｉｄｔｈ ① ﬁ", "x</s>y <s> <unk> <pad>", "emoji 😀 and 中文",
              "▁already", "\u00a0nbsp\u200b", "<0x41>"]


def convert(*argv) -> int:
    return megalite_main(["convert", *map(str, argv)])


@pytest.fixture(scope="module")
def quickstart_sp_model(corpus_jsonl, tmp_path_factory) -> str:
    from megalite.quickstart import tokenizer_args
    from megalite.dataprep import train_tokenizer
    prefix = str(tmp_path_factory.mktemp("qs_tok") / "tokenizer")
    assert train_tokenizer.main(tokenizer_args(corpus_jsonl, prefix, 2000)) == 0
    return prefix + ".model"


def fresh_checkpoint(path, recipe: str, tokenizer_model: str | None, vocab_size: int,
                     overrides: dict | None = None) -> str:
    """A freshly initialized checkpoint saved as a training run saves it, its TrainConfig
    naming the SentencePiece tokenizer."""
    from megalite.checkpoint import save_checkpoint
    from megalite.config import DataConfig, TrainConfig
    from megalite.distributed.parallel_state import ParallelState
    from megalite.model import get_preset
    from megalite.model.gpt import GPTModel
    from megalite.parallel.context import ModelContext
    cfg = get_preset(recipe).replace(vocab_size=vocab_size, **(overrides or {}))
    model = GPTModel(cfg, ModelContext(ParallelState.single()))
    model.init_weights(0)
    data = DataConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tokenizer_model) \
        if tokenizer_model else DataConfig()
    save_checkpoint(str(path), 1, model_chunks=[model], optimizer=None,
                    config=TrainConfig(model=cfg, data=data), ps=ParallelState.single())
    return str(path)


# -- to-hf: the exported tokenizer is the training tokenizer --------------------------------------
@pytest.mark.parametrize("recipe,which", [("tiny-llama", "sp_model"),
                                          ("tiny-llama", "quickstart"), ("tiny", "quickstart")],
                         ids=["llama-sp_model", "llama-quickstart", "gpt2-quickstart"])
def test_to_hf_tokenizer_gives_the_training_ids(recipe, which, sp_model, quickstart_sp_model,
                                                 corpus_texts, tmp_path, capsys):
    import sentencepiece as spm
    model_file = sp_model if which == "sp_model" else quickstart_sp_model
    sp = spm.SentencePieceProcessor(model_file=model_file)
    ckpt = fresh_checkpoint(tmp_path / "ckpt", recipe, model_file, sp.get_piece_size())
    out = tmp_path / "hf"
    assert convert("to-hf", "--load", ckpt, "--save", out) == 0
    assert "tokenizer files ['tokenizer.model', 'tokenizer.json', 'tokenizer_config.json']" \
        in capsys.readouterr().err
    tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = corpus_texts + EDGE_TEXTS
    want = sp.encode(texts)
    got = tok(texts, add_special_tokens=False).input_ids
    bad = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} documents differ, first: {texts[bad[0]]!r}"
    # The default call adds nothing either: megalite never puts BOS/EOS inside a document.
    assert tok(corpus_texts[:50]).input_ids == want[:50]
    assert [tok.decode(ids) for ids in want[:50]] == [sp.decode(ids) for ids in want[:50]]
    # eos/bos/pad: the SentencePiece model's (eos </s> = the end-of-document id), the same in
    # config.json, generation_config.json and the tokenizer.
    expected = {"eos_token_id": sp.eos_id(), "bos_token_id": sp.bos_id(),
                "pad_token_id": sp.pad_id()}
    assert expected == {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 3}
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for source in (config, generation):
        assert {k: source.get(k) for k in expected} == expected
    assert {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id} == expected
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == sp.eos_id()
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == sp.eos_id()


def test_spm_without_pad_and_bos(corpus_jsonl, tmp_path, corpus_texts):
    """A SentencePiece model without pad and bos: pad stays unset everywhere, bos is the eos."""
    import sentencepiece as spm

    from megalite.convert.hf_tokenizer import write_tokenizer_files
    prefix = str(tmp_path / "nopad")
    spm.SentencePieceTrainer.train(input=corpus_jsonl, model_prefix=prefix, vocab_size=600,
                                   model_type="bpe", character_coverage=1.0, bos_id=-1,
                                   pad_id=-1, unk_id=0, eos_id=1, minloglevel=2)
    out = tmp_path / "hf"
    out.mkdir()
    files, ids = write_tokenizer_files(prefix + ".model", "SentencePieceTokenizer", str(out))
    assert (ids.eos, ids.bos, ids.pad) == (1, 1, None)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (1, 1, None)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert tok(corpus_texts[:200], add_special_tokens=False).input_ids == \
        sp.encode(corpus_texts[:200])


def test_spm_settings_reader_matches_protobuf(sp_model, quickstart_sp_model, tmp_path):
    """The wire-format reader gives what the protobuf schema gives; a bad file is an error."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

    from megalite.convert.hf_tokenizer import read_spm_settings, spm_to_tokenizers
    from megalite.errors import MegaliteError
    for path in (sp_model, quickstart_sp_model):
        m = pb.ModelProto()
        m.ParseFromString(Path(path).read_bytes())
        s = read_spm_settings(path)
        assert s["types"] == [p.type for p in m.pieces]
        assert (s["model_type"], s["byte_fallback"]) == (m.trainer_spec.model_type,
                                                         m.trainer_spec.byte_fallback)
        n = m.normalizer_spec
        assert (s["precompiled_charsmap"], s["add_dummy_prefix"], s["remove_extra_whitespaces"],
                s["escape_whitespaces"]) == (n.precompiled_charsmap, n.add_dummy_prefix,
                                             n.remove_extra_whitespaces, n.escape_whitespaces)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\xff")
    with pytest.raises(MegaliteError, match="bad.model: not a readable SentencePiece model"):
        spm_to_tokenizers(str(bad))


def test_hf_tokenizer_json_export_names_the_training_eos(hf_tokenizer_json, corpus_texts,
                                                         tmp_path):
    """A HuggingFaceTokenizer run without a tokenizer_config.json: the export writes one
    naming the eos megalite trained with (and bos = eos, pad unset)."""
    from megalite.convert.hf_tokenizer import write_tokenizer_files
    from megalite.data.tokenizers import build_tokenizer
    out = tmp_path / "hf"
    out.mkdir()
    files, ids = write_tokenizer_files(hf_tokenizer_json, "HuggingFaceTokenizer", str(out))
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    ours = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_json)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (ids.eos, ids.bos, ids.pad) == (ours.eod, ours.eod, None)
    assert (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id) == (ours.eod,
                                                                              ours.eod, None)
    texts = corpus_texts + ["a<|endoftext|>b", " <|endoftext|> "]   # special text stays text
    assert theirs(texts, add_special_tokens=False).input_ids == ours.encode_batch(texts)
    assert ours.eod not in ours.encode("a<|endoftext|>b")
    assert write_tokenizer_files(str(tmp_path / "gone.json"), "HuggingFaceTokenizer",
                                 str(out)) == ([], None)


# -- from-hf: the checkpoint's config holds the shape and the tokenizer ---------------------------
def test_from_hf_checkpoint_config_has_model_and_tokenizer(quickstart_sp_model, corpus_texts,
                                                          tmp_path, capsys, monkeypatch):
    """to-hf then from-hf: the from-hf config is a TrainConfig whose model is the converted
    model's shape and whose tokenizer (the tokenizer.model, copied to SAVE/tokenizer/) gives
    the same ids; `megalite generate --load SAVE` needs no flag, from another directory."""
    import sentencepiece as spm

    from megalite.checkpoint import read_model_config, read_train_config
    from megalite.convert import config_from_hf
    from megalite.data.tokenizers import build_tokenizer
    sp = spm.SentencePieceProcessor(model_file=quickstart_sp_model)
    src = fresh_checkpoint(tmp_path / "src", "tiny-llama", quickstart_sp_model,
                           sp.get_piece_size())
    hf_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    assert convert("to-hf", "--load", src, "--save", hf_dir) == 0
    assert convert("from-hf", "--load", hf_dir, "--save", ckpt) == 0
    assert "tokenizer SentencePieceTokenizer tokenizer.model" in capsys.readouterr().err
    tc = read_train_config(str(ckpt))
    assert type(tc).__name__ == "TrainConfig"
    raw = json.loads((ckpt / "iter_0000000" / "config.json").read_text())
    assert raw == tc.to_dict()              # the format a training save writes
    hf_cfg = transformers.AutoConfig.from_pretrained(hf_dir)
    assert tc.model == config_from_hf(hf_cfg) == read_model_config(str(ckpt))
    assert tc.data.tokenizer_type == "SentencePieceTokenizer"
    assert tc.data.tokenizer_model == str((ckpt / "tokenizer" / "tokenizer.model").resolve())
    assert Path(tc.data.tokenizer_model).read_bytes() == Path(quickstart_sp_model).read_bytes()
    tok = build_tokenizer(tc.data.tokenizer_type, tc.data.tokenizer_model)
    assert tok.encode_batch(corpus_texts[:100]) == sp.encode(corpus_texts[:100])
    monkeypatch.chdir(tmp_path / "hf")        # the path holds from any working directory
    assert megalite_main(["generate", "--load", str(ckpt), "--prompt", "The return",
                          "--max-new-tokens", "3", "--greedy"]) == 0
    # reshard carries the tokenizer kept in the save directory along.
    assert convert("reshard", "--load", ckpt, "--save", tmp_path / "pp2",
                   "--target-pipeline-model-parallel-size", 2) == 0
    moved = read_train_config(str(tmp_path / "pp2")).data.tokenizer_model
    assert moved == str((tmp_path / "pp2" / "tokenizer" / "tokenizer.model").resolve())
    assert os.path.isfile(moved)


def test_from_hf_takes_tokenizer_json_and_reports_none(hf_tokenizer_json, tmp_path, capsys):
    """A directory with only tokenizer.json -> HuggingFaceTokenizer; none -> no tokenizer."""
    from megalite.checkpoint import read_train_config
    from megalite.convert import config_to_hf
    from megalite.data.tokenizers import build_tokenizer
    from megalite.model import get_preset
    hf_dir = tmp_path / "hf"
    cfg = get_preset("tiny-llama").replace(vocab_size=2000)
    transformers.AutoModelForCausalLM.from_config(config_to_hf(cfg)).save_pretrained(hf_dir)
    assert convert("from-hf", "--load", hf_dir, "--save", tmp_path / "bare") == 0
    assert "tokenizer none found" in capsys.readouterr().err
    assert read_train_config(str(tmp_path / "bare")).data.tokenizer_type is None
    (hf_dir / "tokenizer.json").write_bytes(Path(hf_tokenizer_json).read_bytes())
    assert convert("from-hf", "--load", hf_dir, "--save", tmp_path / "ckpt") == 0
    data = read_train_config(str(tmp_path / "ckpt")).data
    assert data.tokenizer_type == "HuggingFaceTokenizer"
    assert build_tokenizer(data.tokenizer_type, data.tokenizer_model).eod == \
        build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_json).eod
    # `train --load` alone takes the model shape and the tokenizer from the checkpoint
    from megalite.training.prepare import parse_train_args
    from megalite.training.trainer import pretrain
    resumed = parse_train_args(["--load", str(tmp_path / "ckpt"), "--mock-data",
                                "--train-iters", "1", "--eval-iters", "0"])
    assert resumed.model == read_train_config(str(tmp_path / "ckpt")).model
    assert resumed.model.hidden_size == cfg.hidden_size and resumed.model.vocab_size == 2000
    assert resumed.data.tokenizer_model == data.tokenizer_model
    assert pretrain(resumed).iteration == 1


# -- reshard: the README example on the quickstart's model shape ----------------------------------
def _readme_reshard_flags() -> list[str]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("megalite convert reshard --load ckpt")
    line = readme[start:readme.index("```", start)].replace("\\\n", " ")
    flags = line.split()[3:]
    assert flags[:4] == ["--load", "ckpt", "--save", flags[3]]
    return flags[4:]


def test_readme_reshard_example_fits_the_quickstart_model(tmp_path, capsys):
    import yaml

    from megalite.model import get_preset
    model = yaml.safe_load(QUICKSTART_YAML.read_text())["model"]
    preset = model.pop("preset")
    shape = get_preset(preset).replace(**model)
    ckpt = fresh_checkpoint(tmp_path / "ckpt", preset, None, 2000, model)
    out = tmp_path / "resharded"
    flags = _readme_reshard_flags()
    assert convert("reshard", "--load", ckpt, "--save", out, *flags) == 0
    meta = json.loads((out / "iter_0000001" / "meta.json").read_text())
    tp = int(flags[flags.index("--target-tensor-parallel-size") + 1])
    pp = int(flags[flags.index("--target-pipeline-model-parallel-size") + 1])
    assert (meta["layout"]["tp_size"], meta["layout"]["pp_size"]) == (tp, pp)
    assert meta["model_config"]["num_query_groups"] == shape.num_query_groups
    capsys.readouterr()
    # TP=4 does not divide the quickstart's 2 key/value groups: a clear error, nothing written.
    assert convert("reshard", "--load", ckpt, "--save", tmp_path / "tp4",
                   "--target-tensor-parallel-size", 4) == 2
    err = capsys.readouterr().err
    assert "num_query_groups=2 is not divisible by 4" in err and "Traceback" not in err
    assert not (tmp_path / "tp4").exists()


# -- --help says what each option does -----------------------------------------------------------
def test_help_is_true(capsys):
    def help_of(command: str) -> str:
        with pytest.raises(SystemExit):
            megalite_main(["convert", command, "--help"])
        return capsys.readouterr().out
    reshard, from_hf, to_hf = help_of("reshard"), help_of("from-hf"), help_of("to-hf")
    assert "--verify" not in reshard                    # it has no such option
    assert "--no-verify-checksums" not in from_hf       # HF files have no megalite manifest
    assert "--verify-tolerance" in from_hf and "--verify-tolerance" in to_hf
    for text in (reshard, to_hf):
        assert "--no-verify-checksums" in text and "manifest" in text
    with pytest.raises(SystemExit) as e:
        convert("from-hf", "--load", "x", "--save", "y", "--no-verify-checksums")
    assert e.value.code == 2
    assert "unrecognized arguments: --no-verify-checksums" in capsys.readouterr().err
