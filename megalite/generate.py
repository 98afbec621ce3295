r"""``megalite generate``: continue a prompt with a trained checkpoint (KV cache, any TP size).

    megalite generate --load CKPT_DIR --prompt "The os module" --max-new-tokens 40 --greedy
    megalite generate --load CKPT_DIR --prompt "..." --temperature 0.8 --top-k 50 --top-p 0.95
    torchrun --nproc-per-node 2 -m megalite generate --load CKPT_DIR \
        --tensor-model-parallel-size 2 --prompt "..."

The checkpoint may have been saved under any TP/PP layout; its weights are resharded on load
into a pipeline-free model split over ``--tensor-model-parallel-size`` ranks (default: every
process; with more processes than that, the data-parallel replicas compute the same thing).
The tokenizer is the one the checkpoint's config names (a relative path is tried as saved, i.e.
from the current directory, then from the checkpoint directory and its parent); the tokenizer
flags override it or stand in when the checkpoint names none (e.g. trained on --mock-data).
The tokenizer must have the model's vocabulary size (``vocab_size`` of the checkpoint's
config, before padding), or fewer tokens only when the checkpoint was trained with that tokenizer
and a larger ``--vocab-size``; ids past the tokenizer's vocabulary are then never chosen.
Only global rank 0 prints the continuation (the new text only) to stdout. Generation stops at
the tokenizer's end-of-document token or after --max-new-tokens tokens. An empty prompt starts
a new document (the end-of-document token is the context).

Encoder-decoder (T5) checkpoints: the prompt is the encoder's input, encoded once; the decoder
starts from the decoder start id and decodes with a KV cache (self-attention cached,
cross-attention keys/values computed once); rank 0 prints what the decoder produced. Sentinel
names in the prompt (``<extra_id_0>``) are the sentinel ids. The start and stop ids, the prompt
and the text: :mod:`megalite.inference.seq2seq_tokens`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NamedTuple

from megalite.errors import MegaliteError

DEFAULT_SEED = 1234


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are MegaliteErrors (``error: ...`` and exit 2 from the CLI)."""

    def error(self, message):
        raise MegaliteError(f"{message} (see megalite generate --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megalite generate",
                description="Generate a continuation of --prompt from a megalite checkpoint with "
                "a KV cache, under any tensor-parallel size (torchrun/srun/mpirun for several "
                "processes). Prints the continuation to stdout (rank 0 only).",
                epilog="Decoding is greedy unless --temperature, --top-k or --top-p is given "
                "(then sampled, reproducibly with --seed). Generation stops at the tokenizer's "
                "end-of-document token or after --max-new-tokens; an empty --prompt starts a new "
                "document. The tokenizer is the one the checkpoint's config names (a relative "
                "path is tried from the current directory, then from the checkpoint directory "
                "and its parents); the tokenizer flags override it. It must have the model's vocab_size "
                "tokens (before padding), or fewer only if the model was trained with it and a "
                "larger --vocab-size (ids past the tokenizer are then never generated). "
                "Example: torchrun "
                "--nproc-per-node 2 -m megalite generate --load ckpt --prompt 'The os module' "
                "--tensor-model-parallel-size 2 --top-p 0.9. For an encoder-decoder (T5) "
                "checkpoint the prompt is the encoder input (sentinels by name, <extra_id_0>) and the "
                "output is the decoder's.")
    p.add_argument("--load", required=True, metavar="DIR",
                   help="checkpoint directory (its 'latest'), or one iter_XXXXXXX directory")
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="load this iteration instead of the latest")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="generate at most N tokens (fewer if the model's "
                   "max_position_embeddings is reached) [default: 64]")
    p.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (the default without sampling flags)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sample with logits / T, T > 0 [sampling default: 1.0]")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens (0: all) [sampling default: 0]")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: among the most likely tokens holding probability P, "
                   "0 < P <= 1 [sampling default: 1.0]")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the sampling generator [default: {DEFAULT_SEED}]")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, metavar="TP",
                   help="tensor-parallel size to run at (any size dividing the heads and query "
                   "groups; need not be the training layout) [default: the number of processes]")
    p.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (default fp32)")
    tok = p.add_argument_group("tokenizer (when the checkpoint names none, or to override it)")
    tok.add_argument("--tokenizer-type", default=None,
                     help="SentencePieceTokenizer, HuggingFaceTokenizer, BertWordPieceLowerCase, "
                     "BertWordPieceCase, GPT2BPETokenizer")
    tok.add_argument("--tokenizer-model", default=None, metavar="FILE",
                     help="SentencePiece .model / tokenizer.json")
    tok.add_argument("--vocab-file", default=None, metavar="FILE",
                     help="vocab.txt for the WordPiece tokenizers, vocab.json for GPT2BPETokenizer")
    tok.add_argument("--merge-file", default=None, metavar="FILE",
                     help="merges.txt for GPT2BPETokenizer")
    return p


def sampling_from_args(args):
    """The :class:`SamplingConfig` the flags ask for (greedy unless a sampling flag is given)."""
    from megalite.inference.sampling import SamplingConfig
    sampling_flags = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                     ("--top-p", args.top_p)) if v is not None]
    if args.greedy and sampling_flags:
        raise MegaliteError(f"--greedy cannot be combined with {', '.join(sampling_flags)}")
    if not sampling_flags:
        return SamplingConfig(greedy=True)
    return SamplingConfig(greedy=False,
                          temperature=1.0 if args.temperature is None else args.temperature,
                          top_k=0 if args.top_k is None else args.top_k,
                          top_p=1.0 if args.top_p is None else args.top_p)


def _saved_tokenizer(train_config) -> dict:
    """tokenizer_type/tokenizer_model/vocab_file/merge_file of a checkpoint's config (TrainConfig
    or dict), and for a NullTokenizer its vocab_size (the model's, less the eod id)."""
    keys = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
    data, model = getattr(train_config, "data", None), getattr(train_config, "model", None)
    if data is not None and not isinstance(data, dict):
        out = {k: getattr(data, k, None) for k in keys}
        vocab = getattr(model, "vocab_size", None)
    else:
        data = train_config.get("data") if isinstance(train_config, dict) else None
        out = {k: (data or {}).get(k) for k in keys}
        vocab = ((train_config.get("model") or {}) if isinstance(train_config, dict) else {}
                 ).get("vocab_size")
    out["vocab_size"] = vocab - 1 if out["tokenizer_type"] == "NullTokenizer" and vocab else None
    return out


def resolve_tokenizer(args, train_config):
    """The tokenizer: from the flags when given, else from the checkpoint's config."""
    from megalite.checkpoint.io import locate_beside_checkpoint
    from megalite.data.tokenizers import build_tokenizer
    merge_file = getattr(args, "merge_file", None)
    if args.tokenizer_type:
        return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                               merge_file)
    if args.vocab_file or merge_file:   # Megatron-LM's default: GPT-2's BPE
        return build_tokenizer("GPT2BPETokenizer", args.tokenizer_model, args.vocab_file,
                               merge_file)
    if args.tokenizer_model:
        raise MegaliteError("--tokenizer-model needs --tokenizer-type")
    saved = _saved_tokenizer(train_config)
    if not saved["tokenizer_type"]:
        raise MegaliteError(f"the checkpoint in {args.load} names no tokenizer (trained on "
                            f"--mock-data?); pass --tokenizer-type and --tokenizer-model or "
                            f"--vocab-file")
    try:
        return build_tokenizer(saved["tokenizer_type"],
                               locate_beside_checkpoint(saved["tokenizer_model"], args.load),
                               locate_beside_checkpoint(saved["vocab_file"], args.load),
                               locate_beside_checkpoint(saved["merge_file"], args.load),
                               vocab_size=saved["vocab_size"])
    except MegaliteError as e:
        raise MegaliteError(f"the checkpoint's tokenizer cannot be loaded ({e}); pass the "
                            f"tokenizer flags to point at it") from None


def check_tokenizer_size(args, tokenizer, model_vocab: int, train_config) -> None:
    """Refuse a tokenizer that is not the size of the one the checkpoint was trained with.

    ``model_vocab``: the checkpoint's unpadded ``vocab_size`` (the padding to
    ``make_vocab_size_divisible_by`` plays no part). The rule: the tokenizer must have exactly
    ``model_vocab`` tokens, or fewer when the checkpoint's own tokenizer (the one its config
    names) has that many too, i.e. the model was trained with an explicit ``--vocab-size``
    larger than its tokenizer; generation then never chooses an id past the tokenizer's.
    """
    size = tokenizer.vocab_size
    if size == model_vocab:
        return
    rule = (f"the tokenizer must have the model's {model_vocab} tokens, or fewer only if the "
            f"model was trained with that tokenizer and a larger --vocab-size")
    head = (f"the tokenizer ({tokenizer.source}) has {size} tokens, the model's vocabulary "
            f"{model_vocab} (vocab_size in the checkpoint's config, before padding)")
    if size > model_vocab:
        raise MegaliteError(f"{head}: not the tokenizer this checkpoint was trained with; {rule}")
    if not args.tokenizer_type:
        return                      # the checkpoint's own tokenizer: trained with --vocab-size
    saved = _saved_tokenizer(train_config)
    if not saved["tokenizer_type"]:
        why = "the checkpoint names no tokenizer to confirm that it was trained with this one"
    else:
        try:
            own = resolve_tokenizer(argparse.Namespace(load=args.load, tokenizer_type=None,
                                                       tokenizer_model=None, vocab_file=None,
                                                       merge_file=None), train_config)
        except MegaliteError as e:
            why = f"{e}, so it cannot confirm the size"
        else:
            if own.vocab_size == size:
                return
            why = f"the checkpoint's own tokenizer ({own.source}) has {own.vocab_size}"
    raise MegaliteError(f"{head}: {why}; {rule}")


class Prepared(NamedTuple):
    """Everything :func:`prepare` derived from the flags and the checkpoint."""

    config: Any            # TransformerConfig for inference (no SP, no recompute, no dropout)
    tokenizer: Any         # megalite.data.tokenizers.Tokenizer
    prompt_ids: list       # the prompt's token ids (may be empty)
    context: list          # what the model is fed: prompt_ids, or [eod] when that is empty
    max_new_tokens: int    # --max-new-tokens, capped by max_position_embeddings
    tp: int                # tensor-parallel size to run at
    seq2seq: Any = None    # encoder-decoder models: their Seq2SeqIds (start, stop, names)


def prepare(args) -> Prepared:
    """Everything that can fail on bad input, checked before any process group exists.

    Returns a :class:`Prepared`.
    """
    from megalite.checkpoint import read_model_config, read_train_config
    if not os.path.isdir(args.load):
        raise MegaliteError(f"--load {args.load}: no such directory")
    saved = read_model_config(args.load, args.iteration)  # "no checkpoint found in ..." if none
    if saved.model_type == "bert":
        raise MegaliteError(f"--load {args.load} holds a BERT model (an encoder: it fills in "
                            "masked tokens, it does not continue text); megalite generate runs "
                            "GPT models")
    # srun/mpirun set their own variables; WORLD_SIZE exists only later (init_from_launch_env)
    from megalite.distributed.launch_env import detect_launch_env
    world = detect_launch_env().world_size
    tp = args.tensor_model_parallel_size or world
    if tp < 1:
        raise MegaliteError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    saved.validate_parallel(tp)   # names the heads/groups/ffn that tp does not divide
    if world % tp:
        raise MegaliteError(f"--tensor-model-parallel-size {tp} needs a multiple of {tp} "
                            f"processes, got {world} (launch with torchrun --nproc-per-node "
                            f"{tp} -m megalite generate ...)")
    if args.max_new_tokens < 0:
        raise MegaliteError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    train_config = read_train_config(args.load, args.iteration)
    tokenizer = resolve_tokenizer(args, train_config)
    check_tokenizer_size(args, tokenizer, saved.vocab_size, train_config)
    prompt_ids = tokenizer.encode(args.prompt)
    ids = prompt_ids or [tokenizer.eod]   # nothing to continue: start a new document
    config = saved.replace(sequence_parallel=False, recompute_granularity=None,
                           hidden_dropout=0.0, attention_dropout=0.0)
    if saved.is_encoder_decoder:
        return _prepare_seq2seq(args, config, tokenizer, train_config, tp)
    limit = saved.max_position_embeddings
    if len(ids) > limit or (len(ids) == limit and args.max_new_tokens > 0):
        raise MegaliteError(f"--prompt is {len(ids)} tokens long; the model has "
                            f"max_position_embeddings={limit} positions, leaving no room to "
                            f"generate")
    new = min(args.max_new_tokens, limit - len(ids))
    if new < args.max_new_tokens and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: generating {new} tokens, not {args.max_new_tokens}: the model holds "
              f"{limit} positions", file=sys.stderr)
    return Prepared(config, tokenizer, prompt_ids, ids, new, tp)


def _prepare_seq2seq(args, config, tokenizer, train_config, tp) -> Prepared:
    """An encoder-decoder's prompt is the encoder input (as many tokens as the positions
    allow; relative positions: any); the decoder makes up to --max-new-tokens tokens."""
    from megalite.inference.seq2seq_tokens import encode_prompt, seq2seq_ids
    special = seq2seq_ids(tokenizer, config, train_config)
    prompt_ids = encode_prompt(tokenizer, args.prompt, special)   # sentinels by name
    ids = prompt_ids or [tokenizer.eod]
    new = args.max_new_tokens
    if config.position_embedding_type != "relative":
        limit = config.max_position_embeddings
        if len(ids) > limit:
            raise MegaliteError(f"--prompt is {len(ids)} tokens long; the encoder has "
                                f"max_position_embeddings={limit} positions")
        new = min(new, limit)
        if new < args.max_new_tokens and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: generating {new} tokens, not {args.max_new_tokens}: the decoder "
                  f"holds {limit} positions", file=sys.stderr)
    return Prepared(config, tokenizer, prompt_ids, ids, new, tp, special)


def generate_text(args, ps, device=None, prepared=None):
    """Load the checkpoint into this rank's model and generate; returns (new ids, text).

    Collective over ``ps``'s tensor-parallel group (every rank calls it with the same args).
    ``prepared``: what :func:`prepare` returned for these args (computed when None).
    """
    import torch
    from megalite.checkpoint import load_model_weights
    from megalite.inference import generate_seq2seq_tokens, generate_tokens
    from megalite.parallel.context import ModelContext
    from megalite.parallel.pipeline.stages import build_model_chunks

    sampling = sampling_from_args(args)
    prepared = prepared or prepare(args)
    config, tokenizer, prompt_ids, ids, new = prepared[:5]
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    # Parameters start uninitialized (torch.empty): the checkpoint fills every one of them.
    (model,) = build_model_chunks(config, ModelContext(ps, device=device, dtype=dtype))
    model.eval()
    load_model_weights(args.load, [model], ps, iteration=args.iteration)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if prepared.seq2seq is not None:
        from megalite.inference.seq2seq_tokens import seq2seq_text
        special = prepared.seq2seq
        out = generate_seq2seq_tokens(model, torch.tensor([ids]), new, sampling,
                                      start=special.start, eod=special.stop, generator=generator)
        new_ids = out.tokens[0].tolist()
        if special.stop in new_ids:
            new_ids = new_ids[:new_ids.index(special.stop)]
        return new_ids, seq2seq_text(tokenizer, new_ids, special)
    # vocab_size: a model trained with a larger --vocab-size than its tokenizer must never
    # choose an id that the tokenizer cannot decode
    out = generate_tokens(model, torch.tensor([ids]), new, sampling, eod=tokenizer.eod,
                          generator=generator, vocab_size=tokenizer.vocab_size)
    new_ids = out.tokens[0].tolist()
    if tokenizer.eod in new_ids:
        new_ids = new_ids[:new_ids.index(tokenizer.eod)]
    return new_ids, continuation_text(tokenizer, prompt_ids, new_ids)


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt's (decoded together, so that a word boundary
    at the seam keeps its space, which decoding the new ids alone would drop)."""
    if not prompt_ids:
        return tokenizer.decode(new_ids)
    before = tokenizer.decode(prompt_ids)
    after = tokenizer.decode(prompt_ids + new_ids)
    return after[len(before):] if after.startswith(before) else tokenizer.decode(new_ids)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sampling_from_args(args)   # flag conflicts before anything heavy
    prepared = prepare(args)   # bad input fails here, on every rank alike, before any group
    import torch
    import torch.distributed as dist
    from megalite.distributed.launch_env import init_from_launch_env
    from megalite.distributed.parallel_state import ParallelState

    # torchrun, srun or mpirun alike (a single process gets no process group)
    started = not dist.is_initialized()
    init_from_launch_env()
    started = started and dist.is_initialized()
    try:
        if dist.is_initialized():
            ps = ParallelState.build(prepared.tp)
        else:
            ps = ParallelState.single()
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.cuda.is_available() else torch.device("cpu"))
        _, text = generate_text(args, ps, device, prepared)
        if ps.rank == 0:
            print(text, flush=True)
    finally:
        if started:
            dist.destroy_process_group()
    return 0
