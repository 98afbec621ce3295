"""``megalite convert {to-hf,from-hf,reshard}``: checkpoint conversion in one process.

* ``to-hf``: a megalite checkpoint of any TP/PP/virtual-stage layout -> a Hugging Face
  ``LlamaForCausalLM`` (LLaMA recipe; ``Qwen2ForCausalLM`` with a QKV-only bias) or
  ``GPT2LMHeadModel`` (classic recipe) directory:
  config.json, safetensors weights (sharded above ``--max-shard-size``), the run's tokenizer
  (:mod:`megalite.convert.hf_tokenizer`) and the eos/bos/pad ids in config.json.
* ``from-hf``: a Hugging Face LLaMA, Mistral (no sliding window), Qwen2 or GPT-2 directory -> a
  megalite checkpoint for any target
  (TP, PP) layout, weights only (training starts a fresh optimizer at iteration 0), whose
  config.json names the full model shape and the directory's tokenizer (copied beside it).
* ``reshard``: a megalite checkpoint -> the same checkpoint under another (TP, PP) layout, the
  optimizer state included (megalite's optimizer, or ZeRO partitions reassembled by name).

Every direction streams tensor by tensor (:mod:`megalite.convert.hf_io`,
:mod:`megalite.convert.offline`): peak memory is about one full tensor, plus the two models
when ``--verify`` runs. The output is written under a temporary name next to ``--save`` and
renamed into place only when everything (verification included) succeeded: a failed or
interrupted conversion leaves nothing at ``--save``.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import textwrap

from megalite.errors import MegaliteError

_DTYPES = ("float32", "bfloat16", "float16")

_EXAMPLES = {
    "to-hf": "  megalite convert to-hf --load ckpts/run1 --save hf/run1 --verify",
    "from-hf": "  megalite convert from-hf --load hf/llama --save ckpts/llama-tp2pp2 \\\n"
               "      --target-tensor-parallel-size 2 --target-pipeline-model-parallel-size 2 "
               "--verify",
    "reshard": "  megalite convert reshard --load ckpts/run1 --save ckpts/run1-tp1pp4 \\\n"
               "      --target-tensor-parallel-size 1 --target-pipeline-model-parallel-size 4",
}
_VERIFY = """--verify builds both models in float32 in this process (memory: about 2 x 4 bytes per
parameter) and compares their logits on a few random token sequences; the conversion fails
(exit 2, nothing written at --save) when the largest absolute difference exceeds
--verify-tolerance."""
_LAYOUT = """The target layout must fit the model: the tensor-parallel size divides the attention
heads, the key/value groups (num_query_groups) and the FFN size; the pipeline size divides
the layers."""
EPILOG = ("examples:\n" + "\n".join(_EXAMPLES.values()) + "\n\n"
          + textwrap.fill(_VERIFY.replace("\n", " ").replace(
              "--verify builds", "--verify (to-hf, from-hf) builds", 1), 90))


def _epilog(command: str) -> str:
    notes = {"to-hf": [_VERIFY], "from-hf": [_VERIFY, _LAYOUT], "reshard": [_LAYOUT]}[command]
    return "example:\n" + _EXAMPLES[command] + "\n\n" + "\n\n".join(notes)


_DESCRIPTIONS = {
    "to-hf": "A megalite checkpoint saved under any TP/PP/virtual-stage layout -> a Hugging Face "
             "LlamaForCausalLM (LLaMA recipe; Qwen2ForCausalLM when only q/k/v have biases) or "
             "GPT2LMHeadModel (classic recipe) directory: "
             "config.json, safetensors weights (sharded above --max-shard-size, with "
             "model.safetensors.index.json), and the run's tokenizer: for a SentencePiece "
             "model, tokenizer.model plus a tokenizer.json built from the model's own "
             "normalizer settings (AutoTokenizer gives the training ids); for a Hugging Face "
             "one, its tokenizer.json; with a tokenizer_config.json naming eos/bos/pad, whose "
             "ids config.json and generation_config.json carry. Vocabulary padding rows are "
             "dropped.",
    "from-hf": "A Hugging Face LLaMA (incl. Llama 3.1 rope scaling), Mistral (without a "
               "sliding window), Qwen2 or GPT-2 directory (config.json + safetensors) -> a "
               "megalite checkpoint (iteration 0, weights only, marked weights_only in "
               "meta.json) laid out for the target TP x PP (DP=1; any DP loads it). Its "
               "config.json holds the model shape and the directory's tokenizer "
               "(tokenizer.model as SentencePieceTokenizer, else tokenizer.json as "
               "HuggingFaceTokenizer), copied to SAVE/tokenizer/, so `megalite train --load "
               "SAVE` and `megalite generate --load SAVE` need no model or tokenizer flags. "
               "Training from it starts a fresh optimizer.",
    "reshard": "A megalite checkpoint -> the same iteration under another TP x PP layout "
               "(DP=1, no virtual stages), with the optimizer state (Adam moments, fp32 "
               "masters, loss scaler) resharded by parameter name; ZeRO partitions of any "
               "stage are reassembled and written as megalite optimizer state, which a ZeRO "
               "run partitions again when it loads. RNG states are those a fresh run of the "
               "new layout seeds. A tokenizer kept in the source save directory (from-hf's "
               "SAVE/tokenizer/) is copied along. --dtype gives a weights-only checkpoint (a "
               "warning says so).",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megalite convert", description="Checkpoint conversion in one process (CPU is "
        "enough), streaming tensor by tensor; the output appears at --save only when complete.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="{to-hf,from-hf,reshard}")
    sub.required = True
    def add(name: str, help: str):
        return sub.add_parser(name, help=help, epilog=_epilog(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description=textwrap.fill(_DESCRIPTIONS[name], 79))
    to_hf = add("to-hf", "megalite checkpoint -> Hugging Face directory")
    from_hf = add("from-hf", "Hugging Face directory -> megalite checkpoint")
    reshard = add("reshard", "megalite checkpoint -> another TP/PP layout")
    for p, load_help, save_help in (
            (to_hf, "megalite save directory (its 'latest') or an iter_* directory",
             "Hugging Face output directory (must not exist, or be empty)"),
            (from_hf, "Hugging Face model directory (config.json + safetensors)",
             "megalite save directory to create (must not exist, or be empty)"),
            (reshard, "megalite save directory (its 'latest') or an iter_* directory",
             "megalite save directory to create (must not exist, or be empty)")):
        p.add_argument("--load", required=True, help=load_help)
        p.add_argument("--save", required=True, help=save_help)
        p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                       help="dtype of the written weights (auto: as stored in --load)")
    for p in (to_hf, reshard):     # from-hf reads Hugging Face files: no manifest to check
        p.add_argument("--no-verify-checksums", action="store_true",
                       help="skip the sha256 check of the megalite checkpoint files read "
                            "against their manifest (sizes are still checked)")
    for p in (from_hf, reshard):
        p.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="T",
                       help="tensor-parallel size of the written checkpoint (default 1)")
        p.add_argument("--target-pipeline-model-parallel-size", type=int, default=1,
                       metavar="P", help="pipeline stages of the written checkpoint (default 1)")
        p.add_argument("--target-expert-model-parallel-size", type=int, default=1,
                       metavar="E", help="expert-parallel size of the written checkpoint "
                       "(MoE models; default 1: every rank holds all experts)")
    for p in (to_hf, from_hf):
        p.add_argument("--verify", action="store_true",
                       help="compare megalite and Hugging Face logits after converting; fail "
                            "when they differ by more than --verify-tolerance")
        p.add_argument("--verify-tolerance", type=float, default=1e-4,
                       help="largest allowed absolute logit difference (default 1e-4, float32)")
        p.add_argument("--verify-sequences", type=int, default=3,
                       help="random token sequences compared (default 3)")
        p.add_argument("--verify-seq-length", type=int, default=32,
                       help="tokens per verification sequence (default 32, at most the "
                            "model's max_position_embeddings)")
    to_hf.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                       help="largest safetensors file in GB (10^9 bytes); default 5")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("target_tensor_parallel_size", "target_pipeline_model_parallel_size"):
        value = getattr(args, flag, 1)
        if value < 1:
            raise MegaliteError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "verify", False) and (args.verify_sequences < 1
                                           or args.verify_seq_length < 1):
        raise MegaliteError("--verify-sequences and --verify-seq-length must be >= 1")
    final = os.path.abspath(args.save)
    if os.path.exists(final) and (not os.path.isdir(final) or os.listdir(final)):
        raise MegaliteError(f"--save {args.save} already exists and is not empty; choose a new "
                            f"directory (conversion never overwrites)")
    if os.path.abspath(args.load) == final:
        raise MegaliteError("--save must differ from --load")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        from megalite.convert import convert_ops
        run = {"to-hf": convert_ops.to_hf, "from-hf": convert_ops.from_hf,
               "reshard": convert_ops.reshard}[args.command]
        message = run(args, tmp)
        if os.path.isdir(final):
            os.rmdir(final)            # empty (checked above)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{message}; written to {args.save}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from megalite.cli import run_main
    sys.exit(run_main(main, sys.argv[1:]))
