"""``--compile`` (``training.compile``): each transformer layer and the loss through
``torch.compile`` (TorchInductor; on CPU it generates C++ built with the system compiler).

What is compiled, per model chunk of this rank:

* every ``TransformerLayer`` (``nn.Module.compile``: parameter names, the state dict and the
  optimizer's view of the parameters are unchanged). Inductor fuses the elementwise work
  between the GEMMs: the norms (RMSNorm/LayerNorm), rotary embedding, the gated activation
  (SwiGLU/GEGLU) and the residual adds, in forward and backward;
* the last stage's head (``GPTModel.lm_head``): final norm, output logits and the vocabulary
  cross-entropy, whose max / exp / sum / divide over the [tokens, vocab] logits fuse into
  fewer passes.

Where compiled code meets what must stay eager, the graph breaks on purpose rather than
tracing it: the tensor-parallel collectives (:mod:`megalite.parallel.comm` runs its
autograd-aware collectives under ``torch.compiler.disable``), so under TP/SP a layer becomes
the compiled local math between its collectives; dropout drawn from the model-parallel RNG
stream (:func:`megalite.model.transformer.dropout` runs eagerly when it is active), so the
masks are the eager ones, identical across layouts and on resume; context parallelism's ring
attention and packed documents' per-document attention (:mod:`megalite.model.attention`);
activation recompute
(the checkpointed region recomputes the compiled layer; selective recompute's checkpoint of the
attention core is eager). At TP=1 without dropout each layer is one graph.

Numerics: inductor re-associates fp32 sums (and computes the norms' statistics in a different
order), so the compiled model equals the eager one to fp32 rounding, not bit for bit
(``tests/unit/test_compile.py`` states the tolerance). Shapes are static (``dynamic=False``):
one graph per layer shape and grad mode, compiled at the first iteration; the time spent
compiling is printed once, after that iteration (:func:`compile_report`).

Refused at start-up with a one-line error: a family other than GPT (BERT and T5 are not
supported yet), MoE layers (data-dependent expert batches), context parallelism (untested:
its ring attention already runs eagerly inside the compiled layers) and DeepSpeed ZeRO-3 (its
parameter-gathering module hooks). Packed documents' per-document attention runs eagerly
inside the compiled layers (a graph break). Generation
(``megalite generate``, the KV cache) is never compiled.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from megalite.errors import ConfigError

__all__ = ["check_compile", "compile_model_chunks", "compile_for_training", "CompileClock",
           "compile_report", "compile_seconds"]

COMPILED_FAMILIES = ("gpt",)


def check_compile(config) -> None:
    """Start-up check of ``--compile`` against the run's config (a TrainConfig): a
    ConfigError naming the flag for what cannot be compiled."""
    if not config.training.compile:
        return
    family = config.model.model_type or "gpt"
    if family not in COMPILED_FAMILIES:
        raise ConfigError(f"--compile (training.compile): --model-type {family} is not "
                          f"supported yet (compiled families: {', '.join(COMPILED_FAMILIES)})",
                          "training", "compile")
    if config.model.num_experts:
        # routing gives each expert a data-dependent number of tokens: recompiles, and the
        # expert-parallel all-to-all would sit inside the graph
        raise ConfigError("--compile (training.compile) is not supported with MoE layers "
                          "(--num-experts) yet", "model", "num_experts")
    if config.parallel.context_parallel_size > 1:
        # the ring attention runs eagerly inside the compiled layers (a graph break), but no
        # compiled context-parallel run has been tested
        raise ConfigError("--compile (training.compile) is not supported with "
                          "--context-parallel-size > 1 yet", "parallel",
                          "context_parallel_size")
    if config.parallel.zero_stage == 3:
        # DeepSpeed's ZeRO-3 gathers each layer's parameters in module hooks, which the
        # compiled layers would have to trace; not supported yet.
        raise ConfigError("--compile (training.compile) is not supported with --zero-stage 3 "
                          "(use ZeRO-1/2 or megalite's own optimizer)", "parallel", "zero_stage")


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (forward and backward graphs;
    dynamo's own accounting, 0.0 if this torch does not keep it)."""
    try:
        from torch._dynamo.utils import calculate_time_spent
        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):
        return 0.0


def compile_model_chunks(chunks: list[nn.Module]) -> int:
    """Compile, in place, every transformer layer and the loss head of ``chunks`` (module
    doc); returns the number of compiled regions. Compilation itself happens lazily, at the
    first forward/backward of each."""
    count = 0
    for chunk in chunks:
        for layer in _layers_of(chunk):
            layer.compile(dynamic=False)
            count += 1
        if getattr(chunk, "post_process", False):
            # the bound method replaced on this instance only
            chunk.lm_head = torch.compile(chunk.lm_head, dynamic=False)
            count += 1
    return count


def compile_for_training(chunks: list[nn.Module], config) -> "CompileClock | None":
    """The trainer's call: with ``--compile``, check it (:func:`check_compile`), compile
    ``chunks`` and return the clock of the first iteration; None without ``--compile``."""
    if not config.training.compile:
        return None
    check_compile(config)
    return CompileClock(compile_model_chunks(chunks))


def _layers_of(chunk: nn.Module) -> list[nn.Module]:
    layers = getattr(chunk, "layers", None)
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else []


class CompileClock:
    """Measures the first iteration of a compiled run and says once what compiling cost."""

    def __init__(self, regions: int):
        self.regions = regions
        self.reported = False
        self.before = compile_seconds()
        self.start = None

    def begin(self) -> None:
        if not self.reported and self.start is None:
            self.start = time.perf_counter()

    def end(self) -> str | None:
        """The one log line, after the first iteration (None afterwards)."""
        if self.reported or self.start is None:
            return None
        self.reported = True
        return compile_report(self.regions, compile_seconds() - self.before,
                              time.perf_counter() - self.start)


def compile_report(regions: int, seconds: float, first_iteration: float) -> str:
    """The log line of :class:`CompileClock`."""
    spent = f"{seconds:.1f} s compiling" if seconds > 0 else "compile time not reported by torch"
    return (f"--compile: {regions} regions (transformer layers; final norm, logits and loss) "
            f"compiled with torch.compile (inductor): {spent}; the first iteration took "
            f"{first_iteration:.1f} s")
