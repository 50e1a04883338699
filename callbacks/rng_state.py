"""Random-number-generator state of every rank, for checkpoints.

Lightning's checkpoints hold no RNG state (DESIGN.md). The task stream of this project does not need
it (tasks and noise are pure functions of ``(seed, iteration)``), but anything else that draws from
the global generators (a policy's own sampling, dropout, a user's callback) would make a resumed run
diverge; carrying the state makes resume exact whatever the model does.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _numpy_state() -> dict[str, Any]:
    # As tensors and builtins only: Lightning loads checkpoints with torch.load(weights_only=True),
    # which refuses numpy arrays.
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]))


def capture() -> dict[str, Any]:
    """The global python, numpy and torch (CPU and, when present, CUDA) generator states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set the global generators from :func:`capture`'s output."""
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def capture_all_ranks(world_size: int) -> list[dict[str, Any]]:
    """Every rank's :func:`capture`, indexed by global rank (a collective: all ranks must call it)."""
    local = capture()
    if world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return gathered
