"""The pretraining loop: one global batch per iteration, every layout, the same numbers.

One iteration::

    microbatches of this DP rank (data/batches.py)
      -> pipeline schedule: forward/backward of every microbatch through this rank's model chunks
         (no pipelining, 1F1B or interleaved; the loss object of the step (training/loss.py) on
         the last stage; backward through the optimizer's backward_fn)
      -> optimizer.finish_grad_sync(): DP gradient all-reduce (or ZeRO's reduce-scatter), tied
         embedding and sequence-parallel gradient sums (parallel/grad_sync.py)
      -> (the previous iteration's loss, gradient norm and stop votes read back: _settle)
      -> optimizer.step(lr): unscale, overflow check, global-norm clip, AdamW (on the device)
      -> metrics: the loss is the mean over the whole global batch (all microbatches, all DP
         ranks), summed with every rank's stop votes in one all-reduce left in flight

What each rank holds: the chunks of its pipeline stage, sharded over its tensor-parallel group;
its own microbatches (sample ids by DP rank); the same global-batch loss after the reduction.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from megalite.config import TrainConfig, check_batch_sizes
from megalite.data.batches import BatchIterator
from megalite.distributed.parallel_state import ParallelState
from megalite.errors import MegaliteError
from megalite.families import family_of
from megalite.model import moe_stats
from megalite.model.moe import set_aux_loss_scale
from megalite.optim.base import StepResult
from megalite.optim.build import build_optimizer
from megalite.parallel.pipeline.schedules import forward_backward
from megalite.parallel.context import ModelContext
from megalite.parallel.context_parallel import local_collate
from megalite.parallel.pipeline.stages import build_model_chunks
from megalite.parallel.random import model_parallel_seed
from megalite.training.compile import compile_for_training
from megalite.training.metrics import (MetricsLogger, device_peak_flops, peak_memory_gib,
                                       throughput_metrics)
from megalite.training.signals import StopMonitor
from megalite.training.step_stats import Settled, StepStats
from megalite.training.resume import check_saved_parts, plan_start, saved_parts
from megalite.training.schedule import (RunLRSchedule, dataset_num_samples,
                                        reconcile_lr_schedule, with_train_iterations)
from megalite.training.wandb_log import wandb_settings


@dataclass
class TrainResult:
    """What a run produced; identical on every rank."""

    losses: list[float] = field(default_factory=list)
    """Global-batch mean training loss of every iteration run in this call, in order."""
    valid_losses: dict[int, float] = field(default_factory=dict)
    """Validation loss by iteration (every --eval-interval)."""
    test_loss: float | None = None
    """Test loss at the end (None without a test split)."""
    iteration: int = 0
    """The last completed iteration."""
    grad_norms: list[float] = field(default_factory=list)
    """Gradient norm (before clipping) of every iteration run in this call."""
    stopped: str | None = None
    """Why the loop ended early: "signal" (SIGUSR1/SIGTERM), "time" (--exit-duration-in-mins)
    or "exit-interval" (--exit-interval), after saving a checkpoint; None when train_iters
    were reached."""


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the loop.

    Call on every rank of the job after ``torch.distributed`` is initialized (or in a single
    process without it). ``ps`` may be passed in (tests reuse one process group for many layouts).
    """

    def __init__(self, config: TrainConfig, ps: ParallelState | None = None):
        self.config = config
        par, tr = config.parallel, config.training
        if ps is None:
            if dist.is_available() and dist.is_initialized():
                ps = ParallelState.build(par.tensor_model_parallel_size,
                                         par.pipeline_model_parallel_size,
                                         par.context_parallel_size,
                                         par.expert_model_parallel_size)
            else:
                if (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                        * par.context_parallel_size * par.expert_model_parallel_size != 1):
                    raise MegaliteError(
                        "--tensor-model-parallel-size/--pipeline-model-parallel-size/"
                        "--context-parallel-size/--expert-model-parallel-size > 1 need "
                        "several processes: start with torchrun, srun or mpirun")
                ps = ParallelState.single()
        self.ps = ps
        self.family = family_of(config.model)   # model, loss, batches, data, FLOPs
        self.num_microbatches = check_batch_sizes(tr, ps.dp_size)
        self.global_batch_size = tr.global_batch_size or tr.micro_batch_size * ps.dp_size
        # --train-samples: the iterations follow from the global batch size
        config = self.config = with_train_iterations(config, self.global_batch_size)
        tr = config.training
        self.seq_length = config.model.training_seq_length
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        self.dtype = config.precision.params_dtype

        torch.manual_seed(tr.seed)
        self.rng_tracker = model_parallel_seed(tr.seed, ps)
        vp = par.num_layers_per_virtual_pipeline_stage
        self.vp_size = 1 if vp is None else (
            config.model.num_layers // (ps.pp_size * vp))
        ctx = ModelContext(ps, rng_tracker=self.rng_tracker, device=self.device)
        self.model_chunks = build_model_chunks(config.model, ctx, vp_size=self.vp_size,
                                               split=par.pipeline_layer_split)
        for chunk in self.model_chunks:
            chunk.init_weights(tr.seed)
            chunk.to(dtype=self.dtype)
        # A weights-only checkpoint (e.g. `megalite convert from-hf`, or any under --finetune)
        # fills the weights before the optimizer exists, so its fp32 master copies / ZeRO
        # partitions start from them.
        self.start = plan_start(tr)
        check_saved_parts(self.start, tr)
        self.weights_only_start = self._load_weights_only(self.start)
        self.optimizer = build_optimizer(self.model_chunks, config, ps)
        self.compile_clock = compile_for_training(self.model_chunks, config)   # --compile
        self.lr_schedule = RunLRSchedule.from_config(config.optim, tr, self.global_batch_size)
        self.iteration = 0
        self._last_saved = -1  # iteration of the last checkpoint written by this process
        self.optimizer_resharded = False   # set by load(): the saved state came by name
        self.skipped_iters = 0
        self.stats = StepStats(ps, self.device)  # the loss and stop votes, read back late
        self.train_data, self.valid_data, self.test_data = self._build_data()
        self.logger = MetricsLogger(enabled=ps.rank == 0, log_json=tr.log_json,
                                    tensorboard_dir=tr.tensorboard_dir,
                                    wandb=wandb_settings(config) if ps.rank == 0 else None)
        self.flops_per_iter = self.family.flops_per_iteration(
            config.model, self.global_batch_size, self.seq_length)
        # MoE layers: router losses and per-expert loads for the log (model/moe_stats.py)
        self.moe_stats = moe_stats.attach(self.model_chunks)
        self.peak_flops = None  # measured lazily, at the first log

    # ---- data ----------------------------------------------------------------------------
    def _build_data(self):
        cfg, tr, ps = self.config, self.config.training, self.ps
        g = self.global_batch_size
        num_samples = dataset_num_samples(tr, g)
        datasets = self.family.build_datasets(cfg, num_samples, self.seq_length, tr.seed)
        if datasets[0] is None:
            raise MegaliteError(f"--split {cfg.data.split!r} leaves no training data")

        collate = self.family.collate_for(cfg)
        if ps.cp_size > 1:   # context parallelism: each CP rank keeps only its chunks
            collate = partial(local_collate, collate, self.seq_length, ps)
        stage_fields = self.family.stage_fields
        fields = None if stage_fields is None else \
            stage_fields(cfg, ps.is_first_pp_stage, ps.is_last_pp_stage)

        def iterator(ds, prefetch=False):
            if ds is None:
                return None
            return BatchIterator(ds, g, tr.micro_batch_size, ps.dp_size, ps.dp_rank,
                                 device=self.device, collate=collate,
                                 fields=fields, prefetch=prefetch)
        # the training batches are prepared one step ahead (data/batches.py)
        return (iterator(datasets[0], prefetch=True),) + tuple(map(iterator, datasets[1:]))

    # ---- one step --------------------------------------------------------------------------
    def _forward_backward(self, microbatches, forward_only: bool
                          ) -> tuple[object, list[torch.Tensor]]:
        """(this step's loss object (the family's), the losses it reported: one per
        microbatch on the last pipeline stage, none elsewhere)."""
        loss = self.family.loss_class(self.num_microbatches,
                                      1.0 if forward_only else self.optimizer.loss_scale)
        if not forward_only:   # the MoE router losses are backpropagated as the LM loss
            set_aux_loss_scale(self.optimizer.loss_scale / self.num_microbatches)
        return loss, forward_backward(
            self.model_chunks, iter(microbatches), self.num_microbatches, self.ps, loss,
            seq_length=self.seq_length // self.ps.cp_size, micro_batch_size=self.config.training.micro_batch_size,
            dtype=self.dtype, forward_only=forward_only,
            backward_fn=None if forward_only else self.optimizer.backward,
            before_last_backward=None if forward_only else self.optimizer.before_last_backward)

    def _step(self) -> tuple[object, list[torch.Tensor], object]:
        """One iteration without the loss reduction: (the step's loss object, the losses it
        reported on this rank, the optimizer's StepResult, possibly still on the device).

        The previous iteration's stats are read back (:meth:`_settle`) after this iteration's
        forward/backward is queued and before its optimizer step, which needs the previous
        step's skip for its learning rate: on a GPU the read waits only for work that is
        already done or queued ahead of this iteration's, so the device never runs dry."""
        for chunk in self.model_chunks:
            chunk.train()
        self.optimizer.zero_grad()
        if self.compile_clock is not None:
            self.compile_clock.begin()
        loss, reported = self._forward_backward(self.train_data.next_global_batch(),
                                                forward_only=False)
        self.optimizer.finish_grad_sync()
        self._settle()
        # Megatron-LM's scheduler advances only after steps that were taken (not skipped)
        result = self.optimizer.step(self.lr_schedule.lr_at(self.iteration - self.skipped_iters))
        self.iteration += 1
        return loss, reported, result

    def _settle(self) -> None:
        """Read back the pending iteration (:mod:`megalite.training.step_stats`) and count
        its skip, before the next optimizer step takes its learning rate."""
        settled = self.stats.settle()
        if settled is not None:
            self.skipped_iters += settled.step.skipped

    def _take_settled(self, now: bool) -> list[Settled]:
        """The iterations read back since the last call, in order; ``now``: the current one
        too (a log, evaluation, checkpoint or the end needs its numbers)."""
        if now:
            self._settle()
        return self.stats.take()

    def train_step(self) -> tuple[float, StepResult]:
        """Run one iteration and read its results back; returns (global-batch mean loss,
        optimizer StepResult in Python numbers)."""
        loss, reported, result = self._step()
        self.stats.queue(self.iteration, loss, reported, result, [0.0, 0.0])
        (settled,) = self._take_settled(now=True)
        self._report_compile_time()
        return settled.loss, settled.step

    def _report_compile_time(self) -> None:
        if self.compile_clock is not None:
            line = self.compile_clock.end()   # once, after the first iteration
            if line and self.ps.rank == 0:
                print(line, flush=True)

    @torch.no_grad()
    def evaluate(self, data: BatchIterator, iters: int) -> float:
        """Mean loss over ``iters`` global batches of ``data`` (dropout off)."""
        for chunk in self.model_chunks:
            chunk.eval()
        total = 0.0
        for _ in range(iters):
            loss, reported = self._forward_backward(data.next_global_batch(), True)
            total += loss.global_mean(reported, self.ps, self.device)
        return total / iters

    # ---- the loop ------------------------------------------------------------------------
    def train(self, monitor: StopMonitor | None = None) -> TrainResult:
        """Train to train_iters, or until every rank agrees to stop (signal or time budget:
        ``monitor``; default: one whose handlers are installed for the duration of this call
        and whose --exit-duration-in-mins counts from it)."""
        if monitor is None:
            with StopMonitor(self.config.training.exit_duration_in_mins,
                             device=self.device) as monitor:
                return self.train(monitor)
        tr = self.config.training
        result = TrainResult()
        self._loop(result, monitor)
        if result.stopped:
            if tr.save and self.iteration != self._last_saved:
                self.save()
            if self.ps.rank == 0:
                print(f"stopping at iteration {self.iteration} ({result.stopped}"
                      + (f"); checkpoint in {tr.save}" if tr.save else "); no --save: nothing "
                         "saved"), flush=True)
            result.iteration = self.iteration
            self.logger.close()
            return result
        if self.test_data is not None and tr.eval_iters:
            result.test_loss = self.evaluate(self.test_data, tr.eval_iters)
            self.logger.log_eval(self.iteration, "test", result.test_loss)
        if tr.save and (not tr.save_interval or self.iteration % tr.save_interval):
            self.save()
        result.iteration = self.iteration
        self.logger.close()
        return result

    def _loop(self, result: TrainResult, monitor: StopMonitor) -> None:
        """Iterations until train_iters, or until every rank agrees to stop (result.stopped).

        Each iteration's loss and stop votes are read one iteration later (:meth:`_step`),
        except where the loop needs them at once: at --log-interval, evaluation and checkpoint
        iterations, --exit-interval and the last iteration. A stop vote read during iteration
        i+1 (a signal or the time budget noticed after iteration i) stops every rank after
        iteration i+1."""
        tr = self.config.training
        interval_start, interval_iters = time.perf_counter(), 0
        stop, last = None, None

        def record(now: bool) -> None:
            nonlocal stop, last
            for last in self._take_settled(now):
                result.losses.append(last.loss)
                result.grad_norms.append(last.step.grad_norm)
                stop = stop or last.stop

        while self.iteration < tr.train_iters:
            loss, reported, step = self._step()
            self.stats.queue(self.iteration, loss, reported, step, monitor.local_votes())
            self._report_compile_time()
            interval_iters += 1
            it = self.iteration
            log = it % tr.log_interval == 0 or it == tr.train_iters
            evaluate = bool(tr.eval_interval and self.valid_data and it % tr.eval_interval == 0)
            save = bool(tr.save and tr.save_interval and it % tr.save_interval == 0)
            exit_now = bool(tr.exit_interval and it % tr.exit_interval == 0)
            record(now=log or evaluate or save or exit_now)
            if stop is not None:   # read during this iteration: stop after it
                record(now=True)
            if log:
                elapsed = time.perf_counter() - interval_start
                self._log(last.loss, last.step, elapsed / interval_iters)
                interval_start, interval_iters = time.perf_counter(), 0
            if evaluate:
                # The k-th evaluation reads the k-th block of validation samples: a function of
                # the iteration alone, so a resumed run evaluates on the same samples.
                k = it // tr.eval_interval - 1
                self.valid_data.consumed_samples = k * tr.eval_iters * self.global_batch_size
                result.valid_losses[it] = self.evaluate(self.valid_data, tr.eval_iters)
                self.logger.log_eval(it, "valid", result.valid_losses[it])
            if save:
                self.save()
            # Preemption / time budget: the votes went with the loss (one collective), so every
            # rank stops after the same iteration (training/signals.py).
            if it < tr.train_iters:
                result.stopped = stop or ("exit-interval" if exit_now else None)
                if result.stopped:
                    return

    def _log(self, loss: float, step, seconds_per_iter: float) -> None:
        tr = self.config.training
        if self.peak_flops is None:
            self.peak_flops, _ = device_peak_flops(self.dtype, tr.peak_tflops)
        throughput = throughput_metrics(
            self.flops_per_iter, self.global_batch_size * self.seq_length, seconds_per_iter,
            self.ps.world_size, self.peak_flops)
        self.logger.log_train(self.iteration, {
            "iteration": self.iteration,
            "train_iters": tr.train_iters,
            "consumed_samples": self.train_data.consumed_samples,
            "loss": loss,
            "lr": self.lr_schedule.lr_at(self.iteration - self.skipped_iters),  # the next step's
            "grad_norm": float(step.grad_norm),
            "loss_scale": float(step.loss_scale),
            "skipped_iters": self.skipped_iters,
            "iteration_time_s": seconds_per_iter,
            **throughput,
            "peak_memory_gib": peak_memory_gib(self.device),
            **self._moe_metrics(),
        })

    def _moe_metrics(self) -> dict:
        """The MoE router metrics of the interval since the last log (a collective over all
        ranks; {} for a dense model)."""
        if not self.moe_stats:
            return {}
        m = self.config.model
        return moe_stats.collect(self.moe_stats, m.num_layers, m.num_experts,
                                 self.num_microbatches, self.ps, self.device)

    def banner(self, resume: str) -> str:
        """The start-up lines rank 0 prints: layout, model and parameters, batch, precision,
        data, tokenizer (as ``--dry-run`` shows them) and where the run starts (``resume``)."""
        from megalite.training.dry_run import plan_run, summary_lines

        plan = plan_run(self.config, self.ps.world_size, check_data=False)   # rank 0 alone
        return "\n".join(summary_lines(plan, self.config, "megalite train")
                         + [f"start: {resume}; {self.config.training.train_iters - self.iteration}"
                            f" iterations to go (to {self.config.training.train_iters})"])

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self) -> str:
        """Collective checkpoint of the whole training state (RNG states included); rank 0
        prints one line saying where it went."""
        from megalite.checkpoint import save_checkpoint
        self._last_saved = self.iteration
        tr = self.config.training
        extra = {"consumed_samples": self.train_data.consumed_samples,
                 "skipped_iters": self.skipped_iters,
                 **saved_parts(tr.no_save_optim, tr.no_save_rng)}
        if not tr.no_save_optim:   # Megatron-LM saves its scheduler with the optimizer
            extra["lr_schedule"] = self.lr_schedule.state()
        start = time.perf_counter()
        path = save_checkpoint(tr.save, self.iteration, model_chunks=self.model_chunks,
                               optimizer=None if tr.no_save_optim else self.optimizer,
                               config=self.config, ps=self.ps, extra=extra,
                               keep_last=tr.keep_last, rng_tracker=self.rng_tracker,
                               save_rng=not tr.no_save_rng)
        if self.ps.rank == 0:
            print(f"saved checkpoint of iteration {self.iteration} to {path} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        return path

    def _load_weights_only(self, start) -> bool:
        """Load the weights of the start checkpoint (any layout) before the optimizer is built
        when the run takes only them (a weights-only checkpoint, --finetune,
        --pretrained-checkpoint) or starts a fresh optimizer (--no-load-optim); True when
        nothing more is loaded (a full resume is done later by :meth:`load`)."""
        from megalite.checkpoint import load_model_weights
        if start.mode == "scratch":
            return False
        weights_only = start.mode == "finetune" or bool(start.extra.get("weights_only"))
        if weights_only or self.config.training.no_load_optim:
            # --no-load-optim: the fresh optimizer's fp32 masters / ZeRO partitions must start
            # from the loaded weights too (load() later restores iteration, data position, RNG)
            load_model_weights(start.directory, self.model_chunks, self.ps,
                               iteration=start.iteration)
        return weights_only

    def load(self, directory: str) -> bool:
        """Resume from ``directory`` (its ``latest``); False when it holds no checkpoint."""
        from megalite.checkpoint import load_checkpoint
        tr = self.config.training
        extra = load_checkpoint(directory, model_chunks=self.model_chunks,
                                optimizer=self.optimizer, ps=self.ps,
                                rng_tracker=self.rng_tracker, iteration=tr.ckpt_step,
                                load_optimizer=not tr.no_load_optim,
                                restore_rng=not tr.no_load_rng)
        if extra is None:
            return False
        if not tr.no_load_optim:   # the schedule saved with the optimizer state
            self.lr_schedule, line = reconcile_lr_schedule(
                self.lr_schedule, extra.get("lr_schedule"), self.config.optim)
            if line and self.ps.rank == 0:
                print(line, flush=True)
        self.optimizer_resharded = bool(extra.get("optimizer_resharded"))
        self.iteration = int(extra["iteration"])
        self.skipped_iters = int(extra.get("skipped_iters", 0))
        self.train_data.consumed_samples = int(extra["consumed_samples"])
        return True


def pretrain(config: TrainConfig, ps: ParallelState | None = None,
             monitor: StopMonitor | None = None) -> TrainResult:
    """Build a :class:`Trainer`, resume from ``--load`` if it holds a checkpoint, and train
    (``monitor``: see :meth:`Trainer.train`)."""
    trainer = Trainer(config, ps)
    load, start = config.training.load, trainer.start
    if start.mode == "finetune":
        why = ("--finetune" if start.directory == load else
               f"--pretrained-checkpoint; no checkpoint in --load {load}" if load else
               "--pretrained-checkpoint")
        message = (f"initialized the weights from {start.directory} (weights only: iteration "
                   f"0, fresh optimizer; {why})")
    elif load:
        if trainer.weights_only_start:
            message = f"initialized the weights from {load} (weights only: fresh optimizer)"
        elif trainer.load(load):
            message = f"resumed from {load} at iteration {trainer.iteration}"
            if config.training.no_load_optim:
                message += " (weights only: fresh optimizer, --no-load-optim)"
            elif trainer.optimizer_resharded:
                message += " (optimizer state resharded by parameter name: another layout " \
                           "or ZeRO stage)"
        else:  # say so: an empty --load directory must not look like a resume
            message = f"no checkpoint in {load}: starting from scratch"
    else:
        message = "from scratch (no --load)"
    if trainer.ps.rank == 0:
        print(trainer.banner(message), flush=True)
    return trainer.train(monitor)
