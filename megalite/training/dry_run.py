"""``megalite train --dry-run``: check a run and print its plan without training.

Checks, in order (each failure is a MegaliteError naming the flag or file): the config (already
checked by the run preparation, training/prepare.py, tokenizer included), the layout against the world size (TP x PP
divides it; heads, query groups, MLP width and vocabulary split over TP; layers over PP and
virtual stages; the global batch over micro x DP; ZeRO's limits), and the data files (every
``--data-path`` prefix opened, its index validated, and its token ids inside the model's
vocabulary: ``data/token_range.py``, which caches the ids' range beside the data).

Plan: per pipeline stage the layers (and virtual chunks) and the parameters of one rank of
that stage, counted on a model built on the meta device (no memory) with
``ParallelState.for_shapes``; microbatches per iteration; and a memory estimate per rank.

Memory estimate per rank (bytes; P = parameters of the rank, d = DP size, ZeRO stage z):

- weights  ``P * w``     w = 2 (bf16/fp16) or 4 (fp32);           / d when z = 3
- grads    ``P * 4``     fp32 gradient (main grads with bf16/fp16); / d when z >= 2
- optimizer ``P * (8 + m)``  Adam moments (2 x fp32) + fp32 master copy (m = 4 with bf16/fp16,
  else 0);                                                         / d when z >= 1
- activations, per layer and microbatch: the model family's estimate
  (:mod:`megalite.families`; for GPT and BERT :func:`megalite.model.memory.
  activation_bytes_per_layer`, Korthikanti et al. 2022), with the s x s attention scores
  only where the attention kernel keeps them (the math backend; never the fused SDPA
  kernels): the plan prints which, for the device a run started here would use.
  Times the layers this rank holds, times the microbatches in flight on the first stage (the
  worst): 1F1B ``min(pp, microbatches)``; interleaved ``min((pp-1)*2 + (vp-1)*pp + 1,
  microbatches*vp)`` chunks of ``layers/(pp*vp)`` layers.
- logits on the last stage: ``s*b*V/t * 4 * 2`` (fp32 logits and their gradient).

It ignores allocator fragmentation, communication buffers and temporary workspace (add
10-20 % in practice); the point is comparing layouts and catching a plan that cannot fit.
"""
from __future__ import annotations

from dataclasses import dataclass

from megalite.config import TrainConfig, check_batch_sizes
from megalite.errors import MegaliteError
from megalite.families import family_of
from megalite.model.memory import activation_bytes_per_layer, attention_scores_note

__all__ = ["StagePlan", "RunPlan", "plan_run", "activation_bytes_per_layer", "dry_run",
           "summary_lines"]

GIB = 2 ** 30


@dataclass
class StagePlan:
    """One pipeline stage, as seen from one of its ranks (every TP rank holds the same shapes)."""

    pp_rank: int
    """Stage index."""
    layer_ranges: list[tuple[int, int]]
    """Global [first, last) layers of each model chunk of this stage."""
    params: int
    """Parameters held by one rank of this stage (its TP shard)."""
    memory_bytes: dict[str, float]
    """Estimated bytes per rank: weights, grads, optimizer, activations, logits, total."""


@dataclass
class RunPlan:
    """What a run would do on ``world_size`` processes."""

    world_size: int
    """Processes."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size."""
    vp: int
    """Model chunks per stage (1 unless interleaved)."""
    num_microbatches: int
    """Microbatches per iteration on each DP rank."""
    global_batch_size: int
    """Sequences per iteration."""
    total_params: int
    """Parameters of the whole model (a tied embedding counted once)."""
    stages: list[StagePlan]
    """Per pipeline stage."""
    data: list[str]
    """One line per data prefix (documents, tokens), or the mock-data note."""
    cp: int = 1
    """Context-parallel size (each rank holds 1/cp of every sequence's activations)."""
    attention_scores: str = ""
    """Whether the activation estimate counts the s x s attention scores, and why."""


def _data_lines(config: TrainConfig, check_ids: bool = True) -> list[str]:
    data = config.data
    if data.mock_data:
        return [f"mock data: random tokens below {config.model.vocab_size}"
                + (" (BERT samples)" if config.model.model_type == "bert" else "")]
    from megalite.data.blended import parse_data_path
    from megalite.data.indexed import IndexedDataset
    from megalite.data.token_range import check_token_ids

    blends = [("", data.data_path)] if data.data_path else [
        (f"{name}: ", paths) for name, paths in zip(("train", "valid", "test"),
                                                    data.per_split_paths()) if paths]
    lines = []
    for label, paths in blends:
        prefixes, weights = parse_data_path(list(paths))
        for k, prefix in enumerate(prefixes):
            ds = IndexedDataset(prefix)  # validates both files; DataFormatError names the file
            if check_ids:   # (the range cache is collective under torch.distributed)
                check_token_ids([prefix], config.model.vocab_size, data.data_cache_path)
            w = f"weight {weights[k]:g}, " if weights else ""
            lines.append(f"{label}{prefix}: {w}{len(ds)} documents, {ds.num_tokens} tokens")
    return lines


def plan_run(config: TrainConfig, world_size: int, check_data: bool = True,
             device: str | None = None) -> RunPlan:
    """Validate ``config`` on ``world_size`` processes and compute the plan (no processes).

    ``check_data=False`` skips the token-id check of the data files (collective when a process
    group exists): for a running job, whose datasets were checked when they were built.
    ``device``: "cpu" or "cuda", where the attention runs (which kernel, so whether the
    scores are kept: :mod:`megalite.model.memory`); None: CUDA when this process has it."""
    import torch

    from megalite.distributed.parallel_state import ParallelState, rank_layout
    from megalite.parallel.context import ModelContext
    from megalite.parallel.pipeline.stages import build_model_chunks, layer_ranges

    par, tr, m = config.parallel, config.training, config.model
    layout = rank_layout(world_size, par.tensor_model_parallel_size,
                         par.pipeline_model_parallel_size, par.context_parallel_size,
                         par.expert_model_parallel_size)
    tp, pp, dp, cp = layout.tp_size, layout.pp_size, layout.dp_size, layout.cp_size
    m.validate_parallel(tp, m.training_seq_length)
    vp = par.virtual_pipeline_size(m.num_layers)
    ranges = layer_ranges(m.num_layers, pp, vp, par.pipeline_layer_split)
    num_micro = check_batch_sizes(tr, dp)
    if par.zero_stage:
        from megalite.optim.zero import validate_zero
        validate_zero(par.zero_stage, (tp, pp, dp), config.precision)
    data = _data_lines(config, check_ids=check_data)

    z = par.zero_stage
    half = config.precision.bf16 or config.precision.fp16
    # context parallelism: every activation (and logit) of a rank is its 1/cp of the tokens
    act_layer = family_of(m).activation_bytes_per_layer(config, tp, device=device) / cp
    # the positions whose logits are computed (an encoder-decoder's: the decoder's)
    out_tokens = (m.decoder_seq_length if m.is_encoder_decoder else None) or m.training_seq_length
    if vp == 1:
        in_flight_layers = min(pp, num_micro) * max(n for r in ranges for a, b in r
                                                    for n in [b - a])
    else:
        chunks = min((pp - 1) * 2 + (vp - 1) * pp + 1, num_micro * vp)
        in_flight_layers = chunks * (m.num_layers // (pp * vp))
    stages, total = [], 0
    for p in range(pp):
        ps = ParallelState.for_shapes(tp, 0, pp, p, dp, layout.ep_size)
        with torch.device("meta"):
            chunks = build_model_chunks(m, ModelContext(ps, device="meta"), vp_size=vp,
                                        split=par.pipeline_layer_split)
        params = sum(t.numel() for c in chunks for t in c.parameters())
        # whole-model count: TP-sharded tensors once per TP rank, replicated ones (norms,
        # row-parallel biases, position table) once
        total += sum(t.numel() * (tp if getattr(t, "tensor_parallel_dim", None) is not None
                                  else 1) for c in chunks for t in c.parameters())
        mem = {
            "weights": params * (2 if half else 4) / (dp if z == 3 else 1),
            "grads": params * 4 / (dp if z >= 2 else 1),
            "optimizer": params * (8 + (4 if half else 0)) / (dp if z >= 1 else 1),
            "activations": act_layer * in_flight_layers if p == 0 else
            act_layer * sum(b - a for a, b in ranges[p]) * min(pp - p, num_micro),
            "logits": (out_tokens / cp * tr.micro_batch_size * m.padded_vocab(tp) / tp
                       * 4 * 2) if p == pp - 1 else 0.0,
        }
        mem["total"] = sum(mem.values())
        stages.append(StagePlan(p, ranges[p], params, mem))
    if m.tied_embeddings and pp > 1:  # the last stage's copy of the word embedding
        total -= m.padded_vocab(tp) * m.hidden_size
    return RunPlan(world_size, tp, pp, dp, vp, num_micro,
                   tr.global_batch_size or tr.micro_batch_size * dp, total, stages, data, cp,
                   attention_scores_note(config, device))


def _tokenizer_line(config: TrainConfig) -> str:
    data = config.data
    if data.tokenizer_type is None:
        return f"tokenizer: none (vocabulary size {config.model.vocab_size} given)"
    return (f"tokenizer: {data.tokenizer_type} {data.tokenizer_model or data.vocab_file} "
            f"(model vocabulary {config.model.vocab_size})")


def summary_lines(plan: RunPlan, config: TrainConfig, title: str) -> list[str]:
    """The run in a few lines (layout, model, batch, precision, data, tokenizer): the head of
    the ``--dry-run`` plan and the banner a real run prints at start-up."""
    prec = "bf16" if config.precision.bf16 else "fp16" if config.precision.fp16 else "fp32"
    m = config.model
    layers, seq = m.num_layers, m.training_seq_length
    if m.is_encoder_decoder:
        layers = f"{m.num_layers} encoder + {m.decoder_layers} decoder"
        seq = f"{m.training_seq_length} (encoder) / {m.decoder_seq_length} (decoder)"
    return [
        f"{title}: {plan.world_size} process(es) = TP {plan.tp} x "
        + (f"CP {plan.cp} x " if plan.cp > 1 else "") + f"PP {plan.pp} x DP {plan.dp}"
        + (f", {plan.vp} virtual chunks per stage" if plan.vp > 1 else "")
        + (f" (each rank holds 1/{plan.cp} of every sequence)" if plan.cp > 1 else ""),
        "model: " + ("" if config.model.model_type == "gpt" else
                     f"{config.model.model_type.upper()} {config.model.norm_placement}-norm, ")
        + f"{layers} layers, hidden {config.model.hidden_size}, "
        f"{config.model.num_attention_heads} heads, vocab {config.model.vocab_size} (padded "
        f"{config.model.padded_vocab(plan.tp)}), seq {seq}; {plan.total_params:,} parameters",
        f"batch: global {plan.global_batch_size} = micro {config.training.micro_batch_size} x "
        f"DP {plan.dp} x {plan.num_microbatches} microbatch(es) per iteration; "
        f"{config.training.train_iters} iterations",
        f"precision {prec}, ZeRO stage {config.parallel.zero_stage}, recompute "
        f"{config.model.recompute_granularity or 'none'}",
        "data: " + "; ".join(plan.data),
        _tokenizer_line(config),
    ]


def format_plan(plan: RunPlan, config: TrainConfig) -> str:
    """The human-readable plan ``--dry-run`` prints."""
    lines = summary_lines(plan, config, "dry run")
    for st in plan.stages:
        layers = ", ".join(f"[{a}, {b})" for a, b in st.layer_ranges)
        mem = st.memory_bytes
        lines.append(
            f"stage {st.pp_rank}: layers {layers}; {st.params:,} parameters per rank; memory "
            f"per rank ~{mem['total'] / GIB:.3f} GiB (weights {mem['weights'] / GIB:.3f}, grads "
            f"{mem['grads'] / GIB:.3f}, optimizer {mem['optimizer'] / GIB:.3f}, activations "
            f"{mem['activations'] / GIB:.3f}, logits {mem['logits'] / GIB:.3f})")
    lines.append(f"activations: {plan.attention_scores}")
    lines.append("ok: nothing was trained (remove --dry-run to start)")
    return "\n".join(lines)


def dry_run(config: TrainConfig, world_size: int) -> str:
    """Validate and plan; returns the text to print. MegaliteError when the run cannot work."""
    from megalite.training.schedule import with_train_iterations

    if not isinstance(world_size, int) or world_size < 1:
        raise MegaliteError(f"--world-size must be a positive integer, got {world_size!r}")
    plan = plan_run(config, world_size)
    return format_plan(plan, with_train_iterations(config, plan.global_batch_size))
