"""Capture and restore every random stream a training run draws from.

A resumed run continues the exact trajectory only if dropout masks, data shuffles and anything
else random continue where they stopped: Python's ``random``, NumPy's global generator, torch's
CPU generator, every CUDA device's generator (when CUDA is in use) and the tensor-parallel
tracker's named streams (:class:`megalite.parallel.random.RNGStatesTracker`).

The captured states are plain containers of ints, strings and tensors, so they go into a rank
file that ``torch.load(weights_only=True)`` reads back (NumPy's key array becomes an int64
tensor for that reason).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from megalite.errors import MegaliteError
from megalite.parallel.random import RNGStatesTracker

__all__ = ["capture_rng_states", "restore_rng_states"]


def capture_rng_states(tracker: RNGStatesTracker | None = None) -> dict[str, Any]:
    """This process's generator states: ``{"python", "numpy", "torch_cpu", "cuda", "tracker"}``.

    ``cuda`` is a list of per-device states when CUDA has been initialized, else None;
    ``tracker`` is ``tracker.get_states()`` or None without a tracker.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    if np_state["bit_generator"] != "MT19937":
        raise MegaliteError(f"cannot checkpoint numpy's global generator of type "
                            f"{np_state['bit_generator']}")
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch_cpu": torch.get_rng_state().clone(),
        "cuda": cuda,
        "tracker": tracker.get_states() if tracker is not None else None,
    }


def restore_rng_states(states: dict[str, Any], tracker: RNGStatesTracker | None = None) -> None:
    """Install states from :func:`capture_rng_states`; the next draws equal those that followed
    the capture. CUDA states are restored when CUDA is available (a checkpoint from a GPU run
    loaded on CPU skips them); the tracker's when both a tracker and saved tracker states exist.
    """
    try:
        py = states["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss"]))
        n = states["numpy"]
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": n["key"].numpy().astype(np.uint32),
                                       "pos": int(n["pos"])},
                             "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
        torch.set_rng_state(states["torch_cpu"])
        if states.get("cuda") is not None and torch.cuda.is_available():
            saved = states["cuda"]
            if len(saved) != torch.cuda.device_count():
                raise MegaliteError(f"the checkpoint holds CUDA generator states for "
                                    f"{len(saved)} device(s), this process sees "
                                    f"{torch.cuda.device_count()}")
            torch.cuda.set_rng_state_all(saved)
        if tracker is not None and states.get("tracker") is not None:
            tracker.set_states(states["tracker"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise MegaliteError(f"checkpoint RNG states are malformed: {type(e).__name__}: {e}") \
            from None
