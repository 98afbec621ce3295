"""Weights & Biases logging (``--wandb-project``), as Megatron-LM starts it: one run per start
of the job, named ``--wandb-exp-name``, in ``--wandb-project`` (``--wandb-entity``), its files
in ``--wandb-save-dir`` (default ``SAVE/wandb``), the run's configuration as the W&B config.

megalite logs from rank 0 (its losses are already global means; Megatron-LM logs from the last
rank) the scalars it writes to TensorBoard, with the same names and steps: ``train/<key>``
every ``--log-interval``, ``valid/loss``, ``valid/ppl``, ``test/...``. ``wandb`` is an optional
dependency (``pip install 'megalite[wandb]'``); ``WANDB_MODE=offline`` needs no server.
"""
from __future__ import annotations

import os

from megalite.errors import MegaliteError

__all__ = ["wandb_settings", "WandbWriter"]


def wandb_settings(config) -> dict | None:
    """``wandb.init`` keywords of a run's TrainConfig, or None without --wandb-project."""
    tr = config.training
    if not tr.wandb_project:
        return None
    return {"project": tr.wandb_project, "name": tr.wandb_exp_name,
            "entity": tr.wandb_entity, "dir": tr.wandb_save_dir or os.path.join(tr.save, "wandb"),
            "config": config.to_dict()}


class WandbWriter:
    """One W&B run; :meth:`log` writes a dict of scalars at a step."""

    def __init__(self, settings: dict):
        try:
            import wandb
        except ImportError:
            raise MegaliteError("--wandb-project needs the wandb package (pip install "
                                "'megalite[wandb]')") from None
        try:
            os.makedirs(settings["dir"], exist_ok=True)
        except OSError as e:
            raise MegaliteError(f"--wandb-save-dir {settings['dir']}: cannot create it "
                                f"({e.strerror})") from None
        self._run = wandb.init(**{k: v for k, v in settings.items() if v is not None})

    @property
    def directory(self) -> str:
        """Where this run's files are (``<dir>/wandb/run-...`` or ``offline-run-...``)."""
        return self._run.dir

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        """Finish the run and stop W&B's service process, which writes the run's files
        (``finish`` alone may leave them unwritten until the process exits)."""
        if self._run is not None:
            import wandb

            self._run.finish()
            wandb.teardown()
            self._run = None
