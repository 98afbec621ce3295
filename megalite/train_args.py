"""``megalite train``'s command line: the flags (Megatron-LM names), the ``--config`` YAML file,
parsed once into :class:`TrainArgs`. Turning them into a checked ``TrainConfig`` (tokenizer,
checkpoint, files) is the run preparation, :mod:`megalite.training.prepare`.

Precedence, lowest first: the dataclass defaults (megalite.config), the model section and
tokenizer of the checkpoint ``--load`` resumes (if it holds one), the model preset
(``--model-preset`` or YAML ``model.preset``), the YAML file, the flags. Every value, from YAML
or a flag, goes through the same checks (megalite.config); errors name the flag, the YAML key
and, for a value from the file, the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from megalite.config import LR_DECAY_STYLES, SECTION_TYPES, SECTIONS, check_keys
from megalite.errors import ConfigError, MegaliteError
from megalite.model.config import NORMALIZATIONS, POSITION_EMBEDDING_TYPES, ACTIVATIONS
from megalite.model.presets import PRESETS, get_preset

# (argument-group title, section, [(flag, field or None (= flag name), argparse kwargs, help)])
_OPTIONS = [
    ("model (start from --model-preset, then override single fields)", "model", [
        ("--model-preset", "_preset", dict(choices=PRESETS, metavar="NAME"),
         f"named model shape to start from: {', '.join(PRESETS)}"),
        ("--num-layers", None, dict(type=int), "transformer layers"),
        ("--hidden-size", None, dict(type=int), "hidden size h"),
        ("--num-attention-heads", None, dict(type=int), "query heads"),
        ("--ffn-hidden-size", None, dict(type=int), "MLP inner width (default 4h)"),
        ("--kv-channels", None, dict(type=int), "per-head width (default h / heads)"),
        ("--group-query-attention", "_gqa", dict(action="store_true"),
         "grouped-query attention with --num-query-groups key/value heads"),
        ("--num-query-groups", None, dict(type=int), "key/value heads (needs "
         "--group-query-attention)"),
        ("--seq-length", None, dict(type=int), "training sequence length"),
        ("--max-position-embeddings", None, dict(type=int),
         "longest supported sequence (default: --seq-length)"),
        ("--vocab-size", None, dict(type=int), "vocabulary size (default: the tokenizer's; "
         "needed with --mock-data unless the preset has one)"),
        ("--position-embedding-type", None, dict(choices=POSITION_EMBEDDING_TYPES), "positions"),
        ("--rotary-base", None, dict(type=float), "RoPE base theta"),
        ("--use-rope-scaling", "_rope_scaling", dict(action="store_true"),
         "Llama 3.1 RoPE frequency scaling (model.rope_scaling: llama3; 'linear' and the "
         "low/high frequency factors are set in the YAML model section)"),
        ("--rope-scaling-factor", None, dict(type=float),
         "divisor of the scaled RoPE frequencies (default 8, Llama 3.1's)"),
        ("--normalization", None, dict(choices=NORMALIZATIONS), "norm layers"),
        ("--norm-epsilon", "layernorm_epsilon", dict(type=float), "epsilon of the norms"),
        ("--swiglu", "_swiglu", dict(action="store_true"), "SwiGLU MLP (activation=swiglu)"),
        ("--activation", None, dict(choices=ACTIVATIONS), "MLP activation"),
        ("--disable-bias-linear", "_no_bias", dict(action="store_true"),
         "no biases in the attention and MLP linears"),
        ("--add-qkv-bias", None, dict(action="store_true"),
         "a bias on the QKV projection even with --disable-bias-linear (Qwen2)"),
        ("--untie-embeddings-and-output-weights", None, dict(action="store_true"),
         "a separate output layer instead of the word embedding"),
        ("--hidden-dropout", None, dict(type=float), "dropout on embeddings and residuals"),
        ("--attention-dropout", None, dict(type=float), "dropout on attention probabilities"),
        ("--init-method-std", None, dict(type=float), "std of the weight init"),
        ("--make-vocab-size-divisible-by", None, dict(type=int),
         "pad the vocabulary to a multiple of this x TP size"),
        ("--recompute-granularity", None, dict(choices=("full", "selective")),
         "activation recompute: every layer, or the attention core only"),
    ]),
    ("parallelism", "parallel", [
        ("--tensor-model-parallel-size", None, dict(type=int), "tensor-parallel size"),
        ("--pipeline-model-parallel-size", None, dict(type=int), "pipeline stages"),
        ("--sequence-parallel", None, dict(action="store_true"),
         "sequence parallelism inside the tensor-parallel group"),
        ("--num-layers-per-virtual-pipeline-stage", None, dict(type=int),
         "interleaved 1F1B with this many layers per virtual stage"),
        ("--pipeline-layer-split", None, dict(type=int, nargs="+", metavar="N"),
         "layers per pipeline stage, e.g. 3 5 5 3 (default: even)"),
        ("--zero-stage", None, dict(type=int, choices=(0, 1, 2, 3)),
         "DeepSpeed ZeRO stage (1: with TP and PP; 2: with TP; 3: neither)"),
        ("--deepspeed-config", None, dict(metavar="FILE"), "a DeepSpeed JSON config to merge"),
    ]),
    ("optimizer and learning rate", "optim", [
        ("--lr", None, dict(type=float), "peak learning rate"),
        ("--min-lr", None, dict(type=float), "learning rate at the end of the decay"),
        ("--lr-warmup-iters", None, dict(type=int), "linear warmup iterations"),
        ("--lr-decay-iters", None, dict(type=int), "decay length (default --train-iters)"),
        ("--lr-decay-style", None, dict(choices=LR_DECAY_STYLES), "decay after the warmup"),
        ("--weight-decay", None, dict(type=float), "AdamW weight decay (not on biases/norms)"),
        ("--adam-beta1", None, dict(type=float), "AdamW beta1"),
        ("--adam-beta2", None, dict(type=float), "AdamW beta2"),
        ("--adam-eps", None, dict(type=float), "AdamW epsilon"),
        ("--clip-grad", None, dict(type=float), "clip the global gradient norm (0: off)"),
    ]),
    ("precision", "precision", [
        ("--bf16", None, dict(action="store_true"), "bf16 model, fp32 master weights and grads"),
        ("--fp16", None, dict(action="store_true"), "fp16 model with dynamic loss scaling"),
        ("--initial-loss-scale", None, dict(type=float), "fp16: first dynamic loss scale"),
        ("--min-loss-scale", None, dict(type=float), "fp16: lowest dynamic loss scale"),
        ("--loss-scale-window", None, dict(type=int), "fp16: clean iterations before x2"),
        ("--hysteresis", None, dict(type=int), "fp16: overflows tolerated before /2"),
        ("--loss-scale", None, dict(type=float), "fp16: a static loss scale"),
    ]),
    ("data and tokenizer", "data", [
        ("--data-path", None, dict(nargs="+", metavar="[WEIGHT] PREFIX"),
         "token files PREFIX.bin/.idx, optionally weighted: 0.3 A 0.7 B"),
        ("--split", None, dict(), "train,valid,test weights over each file's sequences "
         "(its documents, or sentences when the file is sentence-split)"),
        ("--blend-rule", None, dict(choices=("megalite", "megatron")),
         "how the --data-path datasets are interleaved: megalite (Tijdeman's rule: every "
         "dataset's count stays within one sample of its weighted share after every step, "
         "and the blend has exactly the samples asked) or megatron (megatron-core's rule and "
         "sizes, reproducing a Megatron run's blended sample order exactly; it can fall more "
         "than one sample behind a share with three or more datasets)"),
        ("--mock-data", None, dict(action="store_true"), "random tokens, no files"),
        ("--tokenizer-type", None, dict(), "SentencePieceTokenizer, HuggingFaceTokenizer, "
         "BertWordPieceLowerCase or BertWordPieceCase"),
        ("--tokenizer-model", None, dict(metavar="FILE"), "SentencePiece .model / tokenizer.json"),
        ("--vocab-file", None, dict(metavar="FILE"), "vocab.txt for the WordPiece tokenizers"),
        ("--data-cache-path", None, dict(metavar="DIR"), "where dataset index caches go"),
    ]),
    ("training and logging", "training", [
        ("--micro-batch-size", None, dict(type=int), "sequences per microbatch per DP rank"),
        ("--global-batch-size", None, dict(type=int),
         "sequences per iteration over all ranks (default: micro x DP)"),
        ("--train-iters", None, dict(type=int), "iterations to train"),
        ("--seed", None, dict(type=int), "random seed"),
        ("--log-interval", None, dict(type=int), "iterations between metric logs"),
        ("--eval-interval", None, dict(type=int), "iterations between validation runs"),
        ("--eval-iters", None, dict(type=int), "batches per validation/test run (0: none)"),
        ("--log-json", None, dict(metavar="FILE"), "append one JSON object per log line"),
        ("--tensorboard-dir", None, dict(metavar="DIR"), "write TensorBoard scalars here"),
        ("--peak-tflops", None, dict(type=float),
         "the device's peak TFLOP/s in the training precision, the denominator of the "
         "logged MFU (default: the dense peak from megalite's table of GPUs; on CPU, a "
         "matmul measured at the first log, as for GPUs not in the table)"),
        ("--exit-duration-in-mins", None, dict(type=float), "save and stop after this long"),
    ]),
    ("checkpoints", "training", [
        ("--save", None, dict(metavar="DIR"), "checkpoint directory to write"),
        ("--load", None, dict(metavar="DIR"), "checkpoint directory to resume from (its "
         "'latest'); an existing directory with no checkpoint yet starts from scratch (so a "
         "requeued job can pass --load and --save the same DIR); a missing DIR is an error "
         "[default: no resume]"),
        ("--no-load-optim", None, dict(action="store_true"),
         "with --load: take the weights, iteration and data position, but start a fresh "
         "optimizer (AdamW moments, ZeRO partitions) and loss scaler"),
        ("--no-load-rng", None, dict(action="store_true"),
         "with --load: keep this run's seeded random states instead of the saved ones"),
        ("--save-interval", None, dict(type=int), "iterations between checkpoints (needs "
         "--save; default: save only at the end of the run and when stopped by a signal or "
         "--exit-duration-in-mins)"),
        ("--keep-last", None, dict(type=int, metavar="N"),
         "keep only the newest N complete checkpoints (older ones are removed only after a "
         "newer one is complete; default: keep all)"),
    ]),
    ("launch and planning", "training", [
        ("--dry-run", "_dry_run", dict(action="store_true"),
         "validate the config, layout, data and tokenizer, print the plan (layers per stage, "
         "microbatches, parameters and memory per rank) and exit without training"),
        ("--world-size", "_world_size", dict(type=int),
         "with --dry-run: plan for N processes without launching them (default: the "
         "launcher's world size, else 1)"),
    ]),
]


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are MegaliteErrors (one line, exit 2 from the CLI)."""

    def error(self, message):
        raise ConfigError(f"{message} (see megalite train --help)")


def _default_text(section: str, name: str) -> str:
    if section == "model":
        return ""
    f = {f.name: f for f in dataclasses.fields(SECTION_TYPES[section])}.get(name)
    if f is None or f.default is None or f.default is False or f.default is dataclasses.MISSING:
        return ""
    return f" [default: {f.default}]"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``megalite train`` (flag values only; defaults are SUPPRESSed
    so a flag overrides the YAML only when given)."""
    p = _Parser(prog="megalite train", argument_default=argparse.SUPPRESS,
                description="Pretrain a GPT (classic or LLaMA recipe) with tensor, pipeline and "
                "data parallelism. Settings come from --config FILE.yaml (sections model, "
                "parallel, optim, precision, data, training holding the field names of "
                "megalite.config, plus model.preset), overridden by the flags below.",
                epilog="Example: megalite train --config tiny-gpt --mock-data "
                "--train-iters 20; several processes: torchrun --nproc-per-node 4 -m megalite "
                "train --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 ...")
    p.add_argument("--config", dest="_config", metavar="FILE.yaml|NAME",
                   help="YAML file with the settings, or the name of a packaged one ("
                   + ", ".join(packaged_config_names()) + "); flags override it")
    for title, section, options in _OPTIONS:
        group = p.add_argument_group(title)
        for flag, name, kwargs, help_text in options:
            name = name or flag[2:].replace("-", "_")
            dest = name if name.startswith("_") else f"{section}.{name}"
            if "metavar" not in kwargs and "choices" not in kwargs and "action" not in kwargs:
                kwargs = {**kwargs, "metavar": {int: "N", float: "X"}.get(kwargs.get("type"),
                                                                        name.upper())}
            group.add_argument(flag, dest=dest, help=help_text + _default_text(section, name),
                               **kwargs)
    return p


PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_config_names() -> list[str]:
    """Names of the YAML presets shipped in megalite/configs (``tiny-gpt``, ``llama2-7b``...)."""
    return sorted(n[:-5] for n in os.listdir(PACKAGED_CONFIGS) if n.endswith(".yaml"))


def resolve_config_path(name: str) -> str:
    """``--config`` value -> a file: an existing path as given, else a packaged preset by name
    (``tiny-gpt`` or ``tiny-gpt.yaml``), so the presets work from any directory."""
    if os.path.exists(name) or os.sep in name:
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    packaged = os.path.join(PACKAGED_CONFIGS, stem + ".yaml")
    if os.path.isfile(packaged):
        return packaged
    raise ConfigError(f"--config {name}: no such file, and no packaged config of that name "
                      f"(packaged: {', '.join(packaged_config_names())})")


def load_yaml(path: str) -> dict[str, dict]:
    """{section: {key: value}} of a YAML config (a path, or the name of a packaged config);
    ConfigError naming the file for bad YAML, an unknown section or key."""
    import yaml

    path = resolve_config_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}:{where} not valid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(doc).__name__}")
    out = {}
    for section, values in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"--config {path}: unknown section {section!r} (expected "
                              f"{', '.join(SECTIONS)})")
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: section {section} must be a mapping of keys, "
                              f"got {values!r}")
        check_keys(values, section, f"--config {path}",
                   extra=("preset",) if section == "model" else ())
        out[section] = dict(values)
    if "sequence_parallel" in out.get("model", {}):
        raise ConfigError(f"--config {path}: model.sequence_parallel is derived; set "
                          "parallel.sequence_parallel instead", "model", "sequence_parallel")
    return out


def merge_model_values(flags: dict, specials: dict, ym: dict,
                       saved: dict) -> tuple[dict, bool]:
    """Merged GPTConfig field values (the --load checkpoint's < preset < YAML < flags) and
    whether the vocabulary size was given explicitly (a checkpoint's counts as explicit)."""
    preset = specials.get("_preset") or ym.pop("preset", None)
    ym.pop("preset", None)
    base = dict(saved)
    if preset is not None:
        try:
            base.update(dataclasses.asdict(get_preset(str(preset))))
        except MegaliteError as e:
            raise ConfigError(f"--model-preset (model.preset): {e}", "model", "preset") from None
        del base["sequence_parallel"]
    fm = dict(flags)
    if specials.get("_swiglu"):
        if fm.get("activation", "swiglu") != "swiglu":
            raise ConfigError(f"--swiglu contradicts --activation {fm['activation']}",
                              "model", "activation")
        fm["activation"] = "swiglu"
    if specials.get("_no_bias"):
        fm["add_bias_linear"] = False
    if specials.get("_rope_scaling"):
        if ym.get("rope_scaling") not in (None, "llama3"):
            raise ConfigError(f"--use-rope-scaling (llama3) contradicts model.rope_scaling: "
                              f"{ym['rope_scaling']}", "model", "rope_scaling")
        fm["rope_scaling"] = "llama3"
    # Megatron's rule (--num-query-groups only counts with --group-query-attention), unless the
    # YAML file or the preset already has grouped-query attention: then the flag resizes it.
    gqa_before = {**base, **ym}.get("num_query_groups") is not None
    if "num_query_groups" in fm and not specials.get("_gqa") and not gqa_before:
        raise ConfigError("--num-query-groups needs --group-query-attention", "model",
                          "num_query_groups")
    values = {**base, **ym, **fm}
    if specials.get("_gqa") and values.get("num_query_groups") is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N", "model",
                          "num_query_groups")
    if "rope_scaling_factor" in fm and values.get("rope_scaling") is None:
        raise ConfigError("--rope-scaling-factor needs --use-rope-scaling (or model.rope_scaling "
                          "in the YAML file)", "model", "rope_scaling_factor")
    if values.get("max_position_embeddings") is None and values.get("seq_length") is not None:
        values["max_position_embeddings"] = values["seq_length"]
    return values, "vocab_size" in ym or "vocab_size" in fm or "vocab_size" in saved


@dataclass
class TrainArgs:
    """``megalite train``'s command line, parsed: the YAML file read, flags split by section.
    Nothing is checked against other files yet (that is :mod:`megalite.training.prepare`)."""

    flags: dict[str, dict]
    """{section: {field: value}} of the flags given (a flag absent here was not given)."""
    yaml: dict[str, dict]
    """{section: {key: value}} of the ``--config`` file ({} without one)."""
    config_path: str | None = None
    """The ``--config`` file (a packaged config's name resolved to its path)."""
    specials: dict = field(default_factory=dict)
    """Flags that are not one field: --model-preset, --swiglu, --group-query-attention, ..."""
    dry_run: bool = False
    """--dry-run: check and print the plan, do not train."""
    world_size: int | None = None
    """--world-size: the planned world size of a dry run."""

    def value(self, section: str, name: str, default=None):
        """A setting as the flags and the YAML file give it (flag first)."""
        return self.flags[section].get(name, self.yaml.get(section, {}).get(name, default))

    def locate(self, e: ConfigError) -> ConfigError:
        """``e`` prefixed with the --config file when one of its settings came from it."""
        if self.config_path and e.section and any(
                n in self.yaml.get(e.section, {}) and n not in self.flags[e.section]
                for n in e.names):
            return ConfigError(f"--config {self.config_path}: {e}", e.section, e.name, e.names)
        return e


def parse_args(argv=None) -> TrainArgs:
    """``megalite train`` argv -> :class:`TrainArgs` (argparse and YAML errors are ConfigErrors
    naming the flag, or the file and key)."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("_config", None)
    path = resolve_config_path(path) if path else None
    flags: dict[str, dict] = {s: {} for s in SECTIONS}
    specials = {}
    for dest, value in args.items():
        if dest.startswith("_"):
            specials[dest] = value
        else:
            section, name = dest.split(".", 1)
            flags[section][name] = value
    return TrainArgs(flags=flags, yaml=load_yaml(path) if path else {}, config_path=path,
                     specials=specials, dry_run=bool(specials.pop("_dry_run", False)),
                     world_size=specials.pop("_world_size", None))


__all__ = ["TrainArgs", "build_parser", "load_yaml", "merge_model_values", "parse_args",
           "packaged_config_names", "resolve_config_path"]
