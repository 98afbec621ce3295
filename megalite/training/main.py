"""``megalite train``: pretraining from a YAML config and/or Megatron-LM flags.

Single process: ``megalite train --config tiny-gpt --mock-data``.
Several processes: started by torchrun, SLURM ``srun`` or ``mpirun``; rank, world and master
come from the launcher's variables (megalite.distributed.launch_env).
``--dry-run`` checks everything and prints the plan without training (training/dry_run.py).

Exit status: 0 after a finished run and after a stop at --exit-interval (as Megatron-LM), 75
(signals.EXIT_STOPPED) after a stop on SIGUSR1/SIGTERM or --exit-duration-in-mins with a
checkpoint saved (the SLURM scripts requeue on it).
torchrun turns a worker's 75 into its own status 1; so a launch script can still tell a clean
stop from a crash, rank 0 then also writes the reason to the file named by the environment
variable ``MEGALITE_STOP_FILE`` when it is set (launch/torchrun.sh, pretrain_torchrun.sbatch).
"""
from __future__ import annotations

import torch.distributed as dist


def main(argv=None) -> int:
    from megalite.train_args import parse_args
    from megalite.training.prepare import prepare_run

    args = parse_args(argv)       # argv parsed once, before the heavy imports: --help and
    config = prepare_run(args)    # flag errors stay fast
    from megalite.distributed.launch_env import detect_launch_env, init_from_launch_env

    if detect_launch_env().rank == 0:   # accepted Megatron-LM flags that megalite ignores
        for line in args.notices:
            print(line, flush=True)
    if args.dry_run:
        from megalite.training.dry_run import dry_run

        world = args.world_size
        if world is None:
            world = detect_launch_env().world_size
        print(dry_run(config, world), flush=True)
        return 0
    if args.world_size is not None:
        from megalite.errors import MegaliteError
        raise MegaliteError("--world-size is for --dry-run planning; a real run takes its world "
                            "size from the launcher (torchrun, srun, mpirun)")
    import torch

    from megalite.training.signals import EXIT_STOPPED, StopMonitor
    from megalite.training.trainer import pretrain

    # The handlers cover the whole process, not only the loop: a signal during start-up is
    # acted on at the first iteration, and a late copy of it (srun forwards to each node at
    # its own pace) during the final save or shutdown is recorded instead of killing the rank.
    # --exit-duration-in-mins counts from here.
    with StopMonitor(config.training.exit_duration_in_mins) as monitor:
        init_from_launch_env(timeout_s=config.parallel.distributed_timeout_minutes * 60)
        if torch.cuda.is_available():
            monitor.device = torch.device("cuda", torch.cuda.current_device())
        try:
            result = pretrain(config, monitor=monitor)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    if result.stopped and result.stopped != "exit-interval":
        _write_stop_file(f"stopped at iteration {result.iteration} ({result.stopped})")
        return EXIT_STOPPED
    return 0


def _write_stop_file(text: str) -> None:
    """Rank 0 writes ``text`` to $MEGALITE_STOP_FILE (if set): temporary name, then rename."""
    import os
    path = os.environ.get("MEGALITE_STOP_FILE")
    if not path or int(os.environ.get("RANK", "0")) != 0:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
