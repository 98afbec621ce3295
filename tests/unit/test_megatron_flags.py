"""Megatron-LM's flags in `megalite train`: every one is implemented, accepted with one notice
line, or refused with a one-line reason naming it; `--help` explains each; flags that stand for
other settings set them as Megatron-LM's do. Parse level only (no training); exact strings."""
from __future__ import annotations

import json

import pytest

from megalite.cli import run_main
from megalite.errors import ConfigError, MegaliteError
from megalite.megatron_flags import BY_FLAG, COND, FAMILIES, GROUPS, NOTICE, REFUSE, SAME
from megalite.train_args import build_parser, parse_args
from megalite.training import main as train_main
from megalite.training.prepare import parse_train_args

TINY = ["--config", "tiny-gpt", "--mock-data", "--num-layers", "2"]
ENTRIES = [m for _, group in GROUPS for m in group]


def _value_args(m, value="2"):
    return [] if m.nargs == 0 else [value]


@pytest.mark.parametrize("m", [m for m in ENTRIES if m.kind == REFUSE], ids=lambda m: m.flags[0])
def test_each_refused_flag_is_one_line_naming_it_and_the_reason(m):
    with pytest.raises(ConfigError) as e:
        parse_args(TINY + [m.flags[0], *_value_args(m)])
    assert str(e.value) == (f"{m.flags[0]}: {m.text} (a Megatron-LM flag megalite refuses; see "
                            "megalite train --help)")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("m", [m for m in ENTRIES if m.kind == COND], ids=lambda m: m.flags[0])
def test_conditional_flags_pass_their_neutral_value_and_refuse_others(m):
    assert parse_args(TINY + [m.flags[0], m.ok[0]]).notices == []
    with pytest.raises(ConfigError) as e:
        parse_args(TINY + [m.flags[0], "7"])
    assert str(e.value) == (f"{m.flags[0]} 7: {m.text} (accepted: {m.flags[0]} "
                            f"{' or '.join(m.ok)}) (a Megatron-LM flag megalite refuses; see "
                            "megalite train --help)")


@pytest.mark.parametrize("m", [m for m in ENTRIES if m.kind in (NOTICE, SAME)],
                         ids=lambda m: m.flags[0])
def test_accepted_flags_give_one_notice_line_or_none(m):
    for spelling in m.flags:
        notices = parse_args(TINY + [spelling, *_value_args(m)]).notices
        assert notices == ([f"notice: {spelling} is ignored: {m.text}"] if m.kind == NOTICE
                           else [])


@pytest.mark.parametrize("prefix, reason", FAMILIES)
def test_refused_families_name_the_flag(prefix, reason):
    # --moe-router-topk is implemented now; --moe-router-topk-scaling-factor is not
    flag = prefix + ("router-topk-scaling-factor" if prefix.endswith("-") else "")
    for argv in ([flag, "2"], [f"{flag}=2"]):
        with pytest.raises(ConfigError) as e:
            parse_args(TINY + argv)
        assert str(e.value) == (f"{flag}: {reason} (a Megatron-LM flag megalite refuses; see "
                                "megalite train --help)")


def test_help_explains_every_flag_and_no_flag_is_in_both_tables():
    parser = build_parser()   # raises if a flag were both implemented and in the table
    for action in parser._actions:
        if action.option_strings:
            assert action.help and len(action.help) > 10, action.option_strings
    text = " ".join(parser.format_help().split())
    for m in ENTRIES:
        assert m.flags[0] in text
        assert " ".join(m.text.split()) in text.replace("%%", "%"), m.flags[0]
    assert "Refused Megatron-LM flag families: --moe-* (mixture-of-experts" in text
    assert len(BY_FLAG) == sum(len(m.flags) for m in ENTRIES)


def test_unknown_flags_and_abbreviations_are_errors_as_in_megatron():
    with pytest.raises(ConfigError, match="unrecognized arguments: --no-such-flag"):
        parse_args(TINY + ["--no-such-flag"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --train-it 5"):
        parse_args(TINY + ["--train-it", "5"])   # Megatron-LM's parser takes no abbreviations


def test_cli_prints_notices_once_and_a_refusal_on_one_line(capsys):
    rc = run_main(train_main.main, TINY + ["--num-workers", "4", "--use-flash-attn",
                                           "--ckpt-format", "torch_dist", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    notices = [line for line in out.splitlines() if line.startswith("notice:")]
    assert notices == [
        "notice: --num-workers is ignored: megalite has no DataLoader: the batches are cut in "
        "the training process from memory-mapped token files (no worker processes)",
        "notice: --use-flash-attn is ignored: megalite's attention is "
        "torch.nn.functional.scaled_dot_product_attention, which picks its flash, "
        "memory-efficient or plain kernel itself",
        "notice: --ckpt-format is ignored: megalite writes its own checkpoint format: every "
        "rank its shard, synchronously, loadable under any layout"]
    # --train-samples: the plan counts train_samples // global batch (tiny-gpt: 16) iterations
    assert run_main(train_main.main, TINY + ["--train-samples", "100", "--lr-warmup-samples",
                                           "16", "--dry-run"]) == 0
    assert "16 = micro 4 x DP 1 x 4 microbatch(es) per iteration; 6 iterations" in \
        capsys.readouterr().out
    rc = run_main(train_main.main, TINY + ["--rampup-batch-size", "16", "16", "5859375"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --rampup-batch-size: megalite trains with one global batch "
                          "size from the first iteration")


# ---- flags that stand for other settings --------------------------------------------------------
def test_use_distributed_optimizer_is_zero_stage_1():
    assert parse_train_args(TINY).parallel.zero_stage == 0
    assert parse_train_args(TINY + ["--use-distributed-optimizer"]).parallel.zero_stage == 1
    assert parse_train_args(TINY + ["--use-distributed-optimizer", "--zero-stage", "1"]
                            ).parallel.zero_stage == 1
    with pytest.raises(ConfigError, match=r"^--use-distributed-optimizer \(ZeRO stage 1\) "
                                          r"contradicts --zero-stage 2$"):
        parse_train_args(TINY + ["--use-distributed-optimizer", "--zero-stage", "2"])


def test_recompute_flags_follow_megatron_rules():
    assert parse_train_args(TINY + ["--recompute-activations"]).model.recompute_granularity \
        == "selective"
    with pytest.raises(ConfigError, match="--recompute-activations \\(selective\\) contradicts "
                                          "--recompute-granularity full"):
        parse_train_args(TINY + ["--recompute-activations", "--recompute-granularity", "full"])
    full = TINY + ["--recompute-granularity", "full", "--recompute-method"]
    args = parse_args(full + ["uniform", "--recompute-num-layers", "1"])
    from megalite.training.prepare import prepare_run
    assert prepare_run(args).model.recompute_granularity == "full" and args.notices == []
    args = parse_args(full + ["uniform", "--recompute-num-layers", "2"])
    prepare_run(args)
    assert args.notices == [
        "notice: --recompute-method uniform --recompute-num-layers 2: megalite recomputes "
        "every layer on its own, keeping one layer input per layer instead of one per 2 "
        "layers (the same numbers, more memory)"]
    args = parse_args(full + ["block", "--recompute-num-layers", "1"])
    prepare_run(args)
    assert args.notices == [
        "notice: --recompute-method block --recompute-num-layers 1: megalite recomputes all 2 "
        "layers of each model chunk, not only the first 1 (the same numbers, less memory, "
        "more computation)"]
    for argv, message in (
            (TINY + ["--recompute-method", "uniform", "--recompute-num-layers", "1"],
             "need --recompute-granularity full (got None)"),
            (full + ["uniform"], "--recompute-method and --recompute-num-layers go together"),
            (full + ["block", "--recompute-num-layers", "3"],
             "--recompute-num-layers 3: must be between 1 and the layers of a model chunk (2)")):
        with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")):
            parse_train_args(argv)


def test_model_and_layout_flags_that_stand_for_megalite_fields():
    c = parse_train_args(TINY + ["--openai-gelu", "--rotary-seq-len-interpolation-factor", "4",
                                 "--position-embedding-type", "rope"])
    assert (c.model.activation, c.model.rope_scaling, c.model.rope_scaling_factor) == \
        ("gelu_tanh", "linear", 4.0)
    layout = ["--config", "tiny-gpt", "--mock-data", "--num-layers", "10",
              "--pipeline-model-parallel-size", "4"]
    assert parse_train_args(layout + ["--decoder-first-pipeline-num-layers", "1"]
                            ).parallel.pipeline_layer_split == [1, 3, 3, 3]  # 9 over 3 stages
    assert parse_train_args(layout + ["--decoder-first-pipeline-num-layers", "2",
                                      "--decoder-last-pipeline-num-layers", "4"]
                            ).parallel.pipeline_layer_split == [2, 2, 2, 4]
    for first in ("3", "0"):   # 7 layers over 3 stages; Megatron-LM wants >= 1 on the first
        with pytest.raises(ConfigError, match=f"10 layers do not split as first {first}, last "
                                              "None and the rest evenly over 3 other stage"):
            parse_train_args(layout + ["--decoder-first-pipeline-num-layers", first])
    layout[4] = "8"
    assert parse_train_args(layout + ["--num-virtual-stages-per-pipeline-rank", "2"]
                            ).parallel.num_layers_per_virtual_pipeline_stage == 1
    c = parse_train_args(TINY + ["--distributed-timeout-minutes", "60"])
    assert c.parallel.distributed_timeout_minutes == 60.0


def test_flag_overrides_its_alternative_from_the_yaml_but_not_from_a_flag():
    # tiny-gpt.yaml has optim.lr_warmup_iters 10 and training.train_iters 200
    c = parse_train_args(TINY + ["--lr-warmup-fraction", "0.1"])
    assert (c.optim.lr_warmup_fraction, c.optim.lr_warmup_iters) == (0.1, 0)
    c = parse_train_args(TINY + ["--train-samples", "640", "--lr-warmup-samples", "64"])
    assert (c.training.train_samples, c.optim.lr_warmup_samples, c.optim.lr_warmup_iters) == \
        (640, 64, 0)
    for pair in (["--train-iters", "5", "--train-samples", "5"],
                 ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"],
                 ["--lr-decay-iters", "5", "--lr-decay-samples", "5"]):
        with pytest.raises(ConfigError, match="are exclusive"):
            parse_train_args(TINY + pair)
    with pytest.raises(ConfigError, match=r"--lr-decay-samples \(optim.lr_decay_samples\): "
                                          r"needs --train-samples"):
        parse_train_args(TINY + ["--lr-decay-samples", "100"])
    with pytest.raises(ConfigError, match=r"--lr-decay-iters \(optim.lr_decay_iters\): does "
                                          r"not apply to sample-based training"):
        parse_train_args(TINY + ["--train-samples", "640", "--lr-decay-iters", "5"])


def test_data_args_files_and_per_split_paths(tmp_path):
    args_file = tmp_path / "data_args.txt"
    args_file.write_text("0.3 /data/a_text_document\n0.7\n/data/b_text_document\n")
    base = ["--config", "tiny-gpt", "--vocab-size", "1000", "--dry-run"]
    c = parse_train_args(base + ["--data-args-path", str(args_file)])
    assert c.data.data_path == ["0.3", "/data/a_text_document", "0.7", "/data/b_text_document"]
    per_split = tmp_path / "splits.json"
    per_split.write_text(json.dumps({"train": "1 /d/t1 1 /d/t2", "valid": ["/d/v"],
                                     "test": None}))
    c = parse_train_args(base + ["--per-split-data-args-path", str(per_split)])
    assert c.data.per_split_paths() == [["1", "/d/t1", "1", "/d/t2"], ["/d/v"], None]
    assert c.data.data_path is None
    c = parse_train_args(base + ["--train-data-path", "/d/t", "--valid-data-path", "/d/v"])
    assert c.data.per_split_paths() == [["/d/t"], ["/d/v"], None]
    for argv, message in (
            (["--data-args-path", str(args_file), "--data-path", "x"],
             "--data-args-path and --data-path are exclusive"),
            (["--train-data-path", "/d/t", "--split", "1,0,0"],
             "--split does not apply to --train-data-path"),
            (["--train-data-path", "/d/t", "--data-path", "/d/x"],
             "and --data-path are exclusive (Megatron-LM would use --data-path"),
            (["--per-split-data-args-path", str(per_split), "--train-data-path", "/d/t"],
             "--per-split-data-args-path and --train-data-path are exclusive"),
            (["--data-args-path", str(tmp_path / "none.txt")], "none.txt: cannot read it"),
            (["--valid-data-path", "/d/v"], "no training data: give --data-path PREFIX")):
        with pytest.raises(MegaliteError, match=message.replace("(", "\\(")):
            parse_train_args(base + argv)


def test_merge_file_means_gpt2_bpe_and_null_tokenizer_adds_the_eod(hf_tokenizer_json, tmp_path):
    from tokenizers import Tokenizer
    vocab, merges = Tokenizer.from_file(hf_tokenizer_json).model.save(str(tmp_path))
    c = parse_train_args(TINY + ["--vocab-file", vocab, "--merge-file", merges])
    assert (c.data.tokenizer_type, c.model.vocab_size) == ("GPT2BPETokenizer", 2000)
    with pytest.raises(MegaliteError, match="GPT2BPETokenizer needs --merge-file"):
        parse_train_args(TINY + ["--vocab-file", vocab])
    c = parse_train_args(TINY + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "500"])
    assert (c.data.tokenizer_type, c.model.vocab_size) == ("NullTokenizer", 501)
    with pytest.raises(ConfigError, match="NullTokenizer needs --vocab-size N"):
        parse_train_args(["--model-preset", "tiny", "--mock-data", "--tokenizer-type",
                          "NullTokenizer"])


def test_checkpoint_flag_prerequisites():
    for argv, message in ((["--finetune"], r"--finetune \(training.finetune\): needs --load"),
                          (["--ckpt-step", "3"], "needs --load DIR"),
                          (["--wandb-exp-name", "x"], "needs --wandb-project"),
                          (["--wandb-project", "p"], "needs --wandb-save-dir or --save")):
        with pytest.raises(ConfigError, match=message):
            parse_train_args(TINY + argv)
    with pytest.raises(ConfigError, match="exclusive"):
        parse_train_args(TINY + ["--use-checkpoint-opt_param-scheduler",
                                 "--override-opt-param-scheduler"])
