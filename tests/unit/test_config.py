"""TrainConfig and the `megalite train` flags: YAML < flags, validation naming the flag / YAML
key / file, exact to_dict/from_dict round trip, presets, vocabulary size from the tokenizer."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from megalite.config import (DataConfig, OptimConfig, ParallelConfig, PrecisionConfig,
                             TrainConfig, TrainingConfig, check_batch_sizes, resolve_vocab_size)
from megalite.errors import MegaliteError
from megalite.model.presets import PRESETS, get_preset
from megalite.train_args import build_parser
from megalite.training.prepare import parse_train_args

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "megalite", "configs")
TINY = ["--model-preset", "tiny", "--mock-data"]


def write_yaml(tmp_path, text: str, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(argv) -> str:
    with pytest.raises(MegaliteError) as e:
        parse_train_args(argv)
    return str(e.value)


# ---- precedence ------------------------------------------------------------------------------
def test_flags_override_yaml_which_overrides_preset(tmp_path):
    path = write_yaml(tmp_path, """
model: {preset: tiny, num_layers: 4, hidden_dropout: 0.1}
optim: {lr: 3e-4, min_lr: 1.0e-5, lr_decay_style: linear}
training: {micro_batch_size: 2, global_batch_size: 8, train_iters: 50}
data: {mock_data: true}
""")
    c = parse_train_args(["--config", path, "--lr", "0.002", "--num-layers", "6",
                          "--global-batch-size", "16"])
    assert c.model.num_layers == 6                      # flag over YAML
    assert c.model.hidden_dropout == 0.1                # YAML over preset
    assert c.model.hidden_size == 64                    # preset
    assert c.optim.lr == 0.002 and c.optim.min_lr == 1e-5
    assert c.optim.lr_decay_style == "linear"
    assert (c.training.micro_batch_size, c.training.global_batch_size) == (2, 16)
    assert c.training.train_iters == 50
    # YAML writes 3e-4 (no dot) as a string; it is read the way the flag --lr 3e-4 would be.
    assert parse_train_args(["--config", path]).optim.lr == 3e-4


def test_preset_flag_over_yaml_preset(tmp_path):
    path = write_yaml(tmp_path, "model: {preset: tiny}\ndata: {mock_data: true}\n")
    c = parse_train_args(["--config", path, "--model-preset", "tiny-llama"])
    assert c.model.normalization == "RMSNorm" and c.model.num_query_groups == 2


def test_model_recipe_flags():
    c = parse_train_args([
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8",
        "--vocab-size", "500", "--seq-length", "32", "--swiglu", "--disable-bias-linear",
        "--group-query-attention", "--num-query-groups", "2", "--position-embedding-type",
        "rope", "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights",
        "--ffn-hidden-size", "96", "--hidden-dropout", "0.1", "--attention-dropout", "0.2",
        "--recompute-granularity", "selective", "--norm-epsilon", "1e-6", "--add-qkv-bias",
        "--qk-layernorm", "--mock-data"])
    m = c.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size) == (4, 64, 8, 500)
    assert m.activation == "swiglu" and m.add_bias_linear is False
    assert m.num_query_groups == 2 and m.position_embedding_type == "rope"
    assert m.normalization == "RMSNorm" and m.untie_embeddings_and_output_weights
    assert m.ffn_hidden_size == 96 and (m.hidden_dropout, m.attention_dropout) == (0.1, 0.2)
    assert m.recompute_granularity == "selective" and m.layernorm_epsilon == 1e-6
    assert m.add_qkv_bias and not m.add_bias_linear and m.qk_layernorm
    # --seq-length gives max_position_embeddings when nothing else does
    assert m.seq_length == 32 and m.max_position_embeddings == 32 and c.seq_length == 32


def test_rope_scaling_flags(tmp_path):
    base = ["--model-preset", "tiny-llama", "--mock-data"]
    m = parse_train_args(base + ["--use-rope-scaling", "--rope-scaling-factor", "4"]).model
    assert (m.rope_scaling, m.rope_scaling_factor) == ("llama3", 4.0)
    assert parse_train_args(base).model.rope_scaling is None
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rope_scaling: linear\n  rope_scaling_factor: 2.0\n")
    assert parse_train_args(base + ["--config", str(path)]).model.rope_scaling == "linear"
    with pytest.raises(MegaliteError, match="--use-rope-scaling .* contradicts"):
        parse_train_args(base + ["--config", str(path), "--use-rope-scaling"])
    with pytest.raises(MegaliteError, match="--rope-scaling-factor needs --use-rope-scaling"):
        parse_train_args(base + ["--rope-scaling-factor", "4"])


def test_parallel_flags_and_sequence_parallel_has_one_source():
    c = parse_train_args(TINY + ["--num-layers", "8", "--tensor-model-parallel-size", "2",
                                 "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                                 "--num-layers-per-virtual-pipeline-stage", "2",
                                 "--zero-stage", "1"])
    p = c.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.zero_stage) == (2, 2, 1)
    assert p.sequence_parallel and c.model.sequence_parallel
    assert c.vp_size == 2
    split = parse_train_args(TINY + ["--num-layers", "6", "--pipeline-model-parallel-size", "3",
                                     "--pipeline-layer-split", "1", "3", "2"])
    assert split.parallel.pipeline_layer_split == [1, 3, 2] and split.vp_size == 1
    # built by hand: the model's copy follows the parallel section
    t = TrainConfig(model=get_preset("tiny"), parallel=ParallelConfig(sequence_parallel=True))
    assert t.model.sequence_parallel is True
    assert "sequence_parallel" not in t.to_dict()["model"]


def test_zero_with_expert_parallelism_stages_1_2_only():
    """ZeRO-1/2 take expert parallelism (DeepSpeed's MoE path, megalite.optim.zero_experts);
    ZeRO-3 is refused at start-up, also when the stage comes from a --deepspeed-config file,
    and so is a file that switches off the reduce-scatter that path relies on."""
    from megalite.optim.zero_experts import refuse_unsupported
    moe = TINY + ["--disable-bias-linear", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
                  "--expert-model-parallel-size", "2"]
    for stage in (1, 2):
        assert parse_train_args(moe + ["--zero-stage", str(stage)]).parallel.zero_stage == stage
    assert error_of(moe + ["--zero-stage", "3"]) == (
        "--zero-stage (parallel.zero_stage): 3 with --expert-model-parallel-size 2 is not "
        "supported (ZeRO-3 would partition each rank's different experts as one parameter over "
        "the data-parallel group); use --zero-stage 1 or 2 with expert parallelism")
    with pytest.raises(MegaliteError, match=r"^--zero-stage 3 with --expert-model-parallel-size 4 "
                                            r"is not supported .*use --zero-stage 1 or 2"):
        refuse_unsupported(3, 4, {"stage": 3})
    with pytest.raises(MegaliteError, match=r"reduce_scatter = false cannot be combined with "
                                            r"--expert-model-parallel-size 2"):
        refuse_unsupported(1, 2, {"reduce_scatter": False})
    refuse_unsupported(2, 2, {"reduce_scatter": True})
    refuse_unsupported(3, 1, {})          # no expert parallelism: nothing to refuse


def test_precision_dtypes():
    assert PrecisionConfig().params_dtype == torch.float32
    assert parse_train_args(TINY + ["--bf16"]).precision.params_dtype == torch.bfloat16
    c = parse_train_args(TINY + ["--fp16", "--loss-scale", "128"])
    assert c.precision.params_dtype == torch.float16 and c.precision.loss_scale == 128.0


def test_help_has_every_megatron_flag_of_the_issue():
    text = build_parser().format_help()
    for flag in """--tensor-model-parallel-size --pipeline-model-parallel-size --sequence-parallel
        --num-layers --hidden-size --num-attention-heads --seq-length --micro-batch-size
        --global-batch-size --train-iters --lr --min-lr --lr-warmup-iters --lr-decay-style
        --weight-decay --clip-grad --seed --data-path --split --tokenizer-type --tokenizer-model
        --vocab-file --mock-data --bf16 --fp16 --log-interval --eval-interval --eval-iters --save
        --load --save-interval --zero-stage --num-layers-per-virtual-pipeline-stage
        --recompute-granularity --ffn-hidden-size --max-position-embeddings
        --position-embedding-type --normalization --swiglu --untie-embeddings-and-output-weights
        --disable-bias-linear --group-query-attention --num-query-groups --hidden-dropout
        --attention-dropout --config --model-preset --vocab-size --log-json --tensorboard-dir
        --peak-tflops --pipeline-layer-split --deepspeed-config --keep-last --no-load-optim
        --no-load-rng --use-rope-scaling --rope-scaling-factor --add-qkv-bias --blend-rule""".split():
        assert f"  {flag} " in text or f"  {flag}\n" in text, flag
    for group in ("model", "parallelism", "optimizer", "precision", "data", "training",
                  "checkpoints"):
        assert f"\n{group}" in text, group


# ---- presets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_yaml_presets_load(name):
    c = parse_train_args(["--config", os.path.join(CONFIGS, name), "--mock-data"])
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    if name == "llama2-7b.yaml":
        assert c.model == get_preset("llama2-7b").replace(seq_length=4096, sequence_parallel=True,
                                                          recompute_granularity="selective")
        assert c.precision.bf16 and c.parallel.tensor_model_parallel_size == 4
    if name == "llama3.1-8b.yaml":
        assert c.model == get_preset("llama3.1-8b").replace(
            seq_length=8192, sequence_parallel=True, recompute_granularity="selective")
    if name == "gpt2-small.yaml":
        assert c.model == get_preset("gpt2-small").replace(seq_length=1024)
    if name == "tiny-gpt.yaml":
        assert c.model.tied_embeddings and c.model.normalization == "LayerNorm"
    if name == "tiny-llama.yaml":
        assert c.model.activation == "swiglu" and c.model.position_embedding_type == "rope"


def test_qk_layernorm_is_refused_for_the_encoder_decoder():
    # its cross-attention has no query/key norms, so the flag would act on half the attention
    with pytest.raises(MegaliteError, match="qk_layernorm: the encoder-decoder"):
        get_preset("tiny-t5").replace(qk_layernorm=True)
    assert get_preset("tiny-bert").replace(qk_layernorm=True).qk_layernorm


@pytest.mark.parametrize("name", PRESETS)
def test_model_presets_load(name):
    assert parse_train_args(["--model-preset", name, "--mock-data"]).model == get_preset(name)


# ---- vocabulary size -------------------------------------------------------------------------
def test_vocab_size_from_tokenizer_unless_explicit(sp_model):
    tok = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
           "--mock-data"]
    # the tokenizer (vocab 1000) replaces the preset's 50257
    assert parse_train_args(["--model-preset", "gpt2-small"] + tok).model.vocab_size == 1000
    assert parse_train_args(TINY[:2] + tok + ["--vocab-size", "1024"]).model.vocab_size == 1024
    msg = error_of(TINY[:2] + tok + ["--vocab-size", "999"])
    assert "--vocab-size" in msg and "1000" in msg


def test_resolve_vocab_size():
    c = parse_train_args(TINY)
    r = resolve_vocab_size(c, 5000)
    assert r.model.vocab_size == 5000 and c.model.vocab_size == 1000
    assert dataclasses.replace(r.model, vocab_size=1000) == c.model
    with pytest.raises(MegaliteError, match="vocab_size"):
        resolve_vocab_size(c, 0)


# ---- serialization ---------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip_exactly():
    c = TrainConfig(
        model=get_preset("tiny-llama").replace(num_layers=4, hidden_dropout=0.1),
        parallel=ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                sequence_parallel=True, pipeline_layer_split=[1, 3],
                                zero_stage=1, deepspeed_config="ds.json"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-5, lr_warmup_iters=3, lr_decay_iters=40,
                          lr_decay_style="linear", weight_decay=0.1, adam_beta2=0.99,
                          adam_eps=1e-6, clip_grad=0.5),
        precision=PrecisionConfig(fp16=True, initial_loss_scale=1024.0, hysteresis=3,
                                  loss_scale_window=7, min_loss_scale=2.0),
        data=DataConfig(data_path=["0.3", "a", "0.7", "b"], split="90,9,1",
                        tokenizer_type="SentencePieceTokenizer", tokenizer_model="x.model",
                        data_cache_path="cache"),
        training=TrainingConfig(micro_batch_size=2, global_batch_size=8, train_iters=50,
                                seed=7, log_interval=5, eval_interval=10, eval_iters=2,
                                save="ck", load="ck", save_interval=20, log_json="l.jsonl",
                                tensorboard_dir="tb", peak_tflops=1.5,
                                exit_duration_in_mins=3.0))
    d = json.loads(json.dumps(c.to_dict()))
    assert d == c.to_dict()
    back = TrainConfig.from_dict(d)
    assert back == c and back.to_dict() == d


def test_old_checkpoint_configs_with_retired_keys_still_load():
    """data.num_workers (never used) was dropped; configs saved with it still load."""
    d = parse_train_args(TINY).to_dict()
    d["data"]["num_workers"] = 1
    assert TrainConfig.from_dict(d) == parse_train_args(TINY)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(extra={}), "unknown section 'extra'"),
    (lambda d: d["optim"].update(lrr=1.0), "unknown key optim.lrr; did you mean 'lr'?"),
    (lambda d: d["model"].update(hidden=3), "unknown key model.hidden"),
    (lambda d: d.pop("model"), "model section is missing"),
    (lambda d: d["model"].update(sequence_parallel=True), "model.sequence_parallel"),
    (lambda d: d["training"].update(micro_batch_size="x"), "--micro-batch-size"),
])
def test_from_dict_errors(mutate, expected):
    d = parse_train_args(TINY).to_dict()
    mutate(d)
    with pytest.raises(MegaliteError) as e:
        TrainConfig.from_dict(d, source="ckpt/config.json")
    assert expected in str(e.value) and "ckpt/config.json" in str(e.value), str(e.value)


# ---- batch sizes -----------------------------------------------------------------------------
def test_check_batch_sizes():
    assert check_batch_sizes(TrainingConfig(micro_batch_size=2, global_batch_size=16), 4) == 2
    assert check_batch_sizes(TrainingConfig(micro_batch_size=2), 4) == 1
    with pytest.raises(MegaliteError) as e:
        check_batch_sizes(TrainingConfig(micro_batch_size=2, global_batch_size=12), 4)
    assert "--global-batch-size" in str(e.value) and "data-parallel size 4" in str(e.value)


# ---- bad flags: each message names the flag ----------------------------------------------------
BAD_FLAGS = [
    (["--lr", "-1"], ["--lr", "optim.lr"]),
    (["--lr", "abc"], ["--lr"]),
    (["--lr", "0.1", "--min-lr", "1"], ["--min-lr"]),
    (["--adam-beta1", "1.0"], ["--adam-beta1"]),
    (["--adam-beta2", "-0.1"], ["--adam-beta2"]),
    (["--adam-eps", "0"], ["--adam-eps"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--clip-grad", "-1"], ["--clip-grad"]),
    (["--lr-decay-iters", "0"], ["--lr-decay-iters"]),
    (["--lr-warmup-iters", "200", "--train-iters", "100"], ["--lr-warmup-iters"]),
    (["--lr-decay-style", "exp"], ["--lr-decay-style"]),
    (["--bf16", "--fp16"], ["--bf16", "--fp16"]),
    (["--loss-scale", "128"], ["--loss-scale", "--fp16"]),
    (["--fp16", "--initial-loss-scale", "1", "--min-loss-scale", "10"], ["--min-loss-scale"]),
    (["--initial-loss-scale", "0"], ["--initial-loss-scale"]),
    (["--hysteresis", "0"], ["--hysteresis"]),
    (["--loss-scale-window", "0"], ["--loss-scale-window"]),
    (["--tensor-model-parallel-size", "0"], ["--tensor-model-parallel-size"]),
    (["--tensor-model-parallel-size", "3"], ["--tensor-model-parallel-size 3",
                                             "num_attention_heads"]),
    (["--pipeline-model-parallel-size", "0"], ["--pipeline-model-parallel-size"]),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "3"],
     ["--pipeline-model-parallel-size", "--num-layers 4"]),
    (["--num-layers-per-virtual-pipeline-stage", "1"],
     ["--num-layers-per-virtual-pipeline-stage", "--pipeline-model-parallel-size"]),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "3"], ["--num-layers-per-virtual-pipeline-stage"]),
    (["--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "1", "1", "0"],
     ["--pipeline-layer-split"]),
    (["--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "1", "2"],
     ["--pipeline-layer-split", "--num-layers 2"]),
    (["--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "3", "-1"],
     ["--pipeline-layer-split"]),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--pipeline-layer-split", "1",
      "3", "--num-layers-per-virtual-pipeline-stage", "1"], ["--pipeline-layer-split"]),
    (["--zero-stage", "4"], ["--zero-stage"]),
    (["--zero-stage", "3", "--tensor-model-parallel-size", "2"], ["--zero-stage 3"]),
    (["--zero-stage", "2", "--num-layers", "4", "--pipeline-model-parallel-size", "2"],
     ["--zero-stage 2", "--pipeline-model-parallel-size"]),
    (["--deepspeed-config", "/nonexistent/ds.json"], ["--deepspeed-config"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size"]),
    (["--micro-batch-size", "4", "--global-batch-size", "10"], ["--global-batch-size"]),
    (["--train-iters", "0"], ["--train-iters"]),
    (["--log-interval", "0"], ["--log-interval"]),
    (["--eval-interval", "0"], ["--eval-interval"]),
    (["--eval-iters", "-1"], ["--eval-iters"]),
    (["--save-interval", "10"], ["--save-interval", "--save"]),
    (["--keep-last", "0", "--save", "ckpt"], ["--keep-last"]),
    (["--peak-tflops", "0"], ["--peak-tflops"]),
    (["--exit-duration-in-mins", "-1"], ["--exit-duration-in-mins"]),
    (["--split", "a,b"], ["--split"]),
    (["--blend-rule", "tijdeman"], ["--blend-rule"]),
    (["--seed", "-1"], ["--seed"]),
    (["--seed", str(2**32)], ["--seed"]),
    (["--data-path", "0.3", "a", "b"], ["--data-path"]),
    (["--data-path", "prefix"], ["--mock-data", "--data-path"]),  # both given (TINY has mock)
    (["--tokenizer-model", "x.model"], ["--tokenizer-type"]),
    (["--tokenizer-type", "Foo"], ["--tokenizer-type"]),
    (["--tokenizer-type", "SentencePieceTokenizer"], ["--tokenizer-model"]),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/nonexistent.model"],
     ["--tokenizer-model"]),
    (["--num-query-groups", "2"], ["--num-query-groups", "--group-query-attention"]),
    (["--group-query-attention"], ["--group-query-attention", "--num-query-groups"]),
    (["--group-query-attention", "--num-query-groups", "3"], ["--num-query-groups"]),
    (["--swiglu", "--activation", "gelu"], ["--swiglu", "--activation"]),
    (["--hidden-size", "66"], ["--hidden-size"]),
    (["--seq-length", "256"], ["--seq-length", "--max-position-embeddings"]),
    (["--hidden-dropout", "1.0"], ["--hidden-dropout"]),
    (["--position-embedding-type", "alibi"], ["--position-embedding-type"]),
    (["--recompute-granularity", "some"], ["--recompute-granularity"]),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "63"],
     ["--sequence-parallel", "--tensor-model-parallel-size"]),
    (["--no-such-flag"], ["--no-such-flag"]),
]


@pytest.mark.parametrize("extra, names", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_values_name_the_flag(extra, names):
    msg = error_of(TINY + extra)
    for name in names:
        assert name in msg, (name, msg)


@pytest.mark.parametrize("argv, names", [
    (["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"],
     ["--vocab-size", "--tokenizer-type"]),
    (["--mock-data", "--vocab-size", "100"], ["--model-preset", "--num-layers"]),
    (["--model-preset", "tiny"], ["--data-path", "--mock-data"]),
    (["--model-preset", "nano", "--mock-data"], ["--model-preset"]),
])
def test_incomplete_configs_name_what_is_missing(argv, names):
    msg = error_of(argv)
    for name in names:
        assert name in msg, (name, msg)


# ---- bad YAML: each message names the file and the key -----------------------------------------
BAD_YAML = [
    ("optim: {lr: -1.0}", ["optim.lr", "--lr"]),
    ("optim: {lrr: 1.0}", ["optim.lrr", "did you mean 'lr'"]),
    ("training: {micro_batch_size: two}", ["training.micro_batch_size"]),
    ("training: {micro_batch_size: 2.5}", ["training.micro_batch_size", "integer"]),
    ("precision: {bf16: yes_please}", ["precision.bf16", "true or false"]),
    ("parallel: {pipeline_model_parallel_size: 2, pipeline_layer_split: [1, 2]}",
     ["parallel.pipeline_layer_split"]),
    ("model: {hidden_size: abc}", ["model.hidden_size"]),
    ("model: {num_attention_heads: 5}", ["model.num_attention_heads"]),
    ("model: {sequence_parallel: true}", ["model.sequence_parallel", "parallel.sequence_parallel"]),
    ("trainer: {}", ["unknown section 'trainer'"]),
    ("optim: 3", ["section optim must be a mapping"]),
    ("- a\n- b", ["expected a mapping"]),
    ("optim: {lr: [1, 2}", ["not valid YAML", "line 1"]),
]


@pytest.mark.parametrize("text, names", BAD_YAML, ids=[t for t, _ in BAD_YAML])
def test_bad_yaml_names_file_and_key(tmp_path, text, names):
    path = write_yaml(tmp_path, text)
    msg = error_of(TINY + ["--config", path])
    assert path in msg, msg
    for name in names:
        assert name in msg, (name, msg)


def test_unknown_yaml_preset_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path, "model: {preset: nano}")
    msg = error_of(["--mock-data", "--config", path])
    assert path in msg and "model.preset" in msg and "unknown model preset 'nano'" in msg


def test_missing_yaml_file_names_it():
    assert "--config /nonexistent/x.yaml" in error_of(["--config", "/nonexistent/x.yaml"])


def test_packaged_configs_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # outside the clone: no configs/ here
    by_name = parse_train_args(["--config", "tiny-llama", "--mock-data"])
    assert by_name == parse_train_args(["--config", os.path.join(CONFIGS, "tiny-llama.yaml"),
                                        "--mock-data"])
    assert parse_train_args(["--config", "tiny-llama.yaml", "--mock-data"]) == by_name
    msg = error_of(["--config", "tiny-lama", "--mock-data"])
    assert msg.startswith("--config tiny-lama: no such file, and no packaged config of that "
                          "name (packaged: gpt2-small, llama2-7b, llama3.1-8b, quickstart, ")
    (tmp_path / "tiny-llama.yaml").write_text("model: {preset: tiny}\ndata: {mock_data: true}\n")
    assert parse_train_args(["--config", "tiny-llama.yaml"]).model == get_preset("tiny")  # a file wins


def test_num_query_groups_resizes_gqa_that_the_yaml_or_preset_enables(tmp_path):
    """Megatron's rule: --num-query-groups needs --group-query-attention, unless the YAML file
    or the preset already has grouped-query attention (then the flag only resizes it)."""
    assert parse_train_args(["--config", "tiny-llama", "--mock-data", "--num-query-groups",
                             "1"]).model.num_query_groups == 1
    assert parse_train_args(["--model-preset", "tiny-llama", "--mock-data",
                             "--num-query-groups", "4"]).model.num_query_groups == 4
    assert "--num-query-groups needs --group-query-attention" in error_of(
        ["--config", "tiny-gpt", "--mock-data", "--num-query-groups", "2"])


def test_help_states_checkpoint_defaults_and_the_mfu_peak():
    text = " ".join(build_parser().format_help().split())
    assert "a missing DIR is an error [default: no resume]" in text
    assert "an existing directory with no checkpoint yet starts from scratch" in text
    assert ("default: save only at the end of the run and when stopped by a signal, "
            "--exit-interval or --exit-duration-in-mins") in text
    assert "the denominator of the logged MFU" in text
    assert ("packaged one (gpt2-small, llama2-7b, llama3.1-8b, quickstart, tiny-bert, tiny-gpt, "
            "tiny-llama, tiny-t5)") in text


def test_flag_fixes_a_bad_yaml_value(tmp_path):
    path = write_yaml(tmp_path, "optim: {lr: -1.0}")
    assert parse_train_args(TINY + ["--config", path, "--lr", "0.1"]).optim.lr == 0.1


def test_cli_turns_errors_into_one_line_and_exit_2(capsys):
    from megalite.cli import run_main

    assert run_main(parse_train_args, TINY + ["--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lr (optim.lr)") and "Traceback" not in err
    assert run_main(parse_train_args, ["--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


def test_a_preset_does_not_replace_the_checkpoint_vocabulary():
    # A run from a YAML file with a preset, its vocabulary taken from the tokenizer (2002),
    # resumed with the same file: the checkpoint's size stands (the preset says 1000).
    from megalite.train_args import merge_model_values
    values, explicit = merge_model_values({}, {"_preset": "tiny"}, {}, {"vocab_size": 2002})
    assert values["vocab_size"] == 2002 and explicit
    values, _ = merge_model_values({"vocab_size": 3000}, {"_preset": "tiny"}, {},
                                   {"vocab_size": 2002})
    assert values["vocab_size"] == 3000                 # a flag still overrides it
