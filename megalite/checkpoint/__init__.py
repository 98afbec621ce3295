"""Checkpoints: atomic sharded save, verified safe load, exact resume, any-layout model weights.

* :mod:`.io`: directory names, durable writes, ``latest``, manifest, pruning, safe ``torch.load``.
* :mod:`.sharded`: the collective :func:`save_checkpoint` / :func:`load_checkpoint`.
* :mod:`.reshard`: :func:`load_model_weights` under any TP/PP/virtual-stage layout.
* :mod:`.reshard_optim`: megalite Optimizer state (by parameter name) under another layout.
  (Offline resharding, ``megalite convert reshard``, lives in :mod:`megalite.convert`.)
* :mod:`.rng`: :func:`capture_rng_states` / :func:`restore_rng_states`.
"""
from megalite.checkpoint.io import list_checkpoints, prune_checkpoints, resolve_checkpoint
from megalite.checkpoint.reshard import load_model_weights, read_model_config, read_train_config
from megalite.checkpoint.rng import capture_rng_states, restore_rng_states
from megalite.checkpoint.sharded import checkpoint_extra, load_checkpoint, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_extra", "load_model_weights", "read_model_config",
           "read_train_config", "capture_rng_states", "restore_rng_states", "list_checkpoints",
           "prune_checkpoints", "resolve_checkpoint"]
