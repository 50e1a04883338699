"""Data-parallel reductions of the meta-gradient and of per-rank statistics (torch.distributed).

The meta-gradient of MAML is a gradient of a gradient, which DDP's reducer does not sync
(pytorch#47562), so the module computes it locally and averages it here, once per optimiser step.
Every function is the identity (or a no-op) on one process, so callers need no special case.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the data-parallel ranks (a new tensor; any shape).

    Needs an initialised process group; :func:`mean_over_ranks` is the one-process-safe variant.
    """
    total = tensor.detach().clone()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return total


def mean_over_ranks(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """``tensor`` averaged over ``world_size`` ranks (a new tensor; ``tensor`` itself on one process)."""
    if world_size <= 1:
        return tensor
    return sum_over_ranks(tensor) / world_size


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks with one flattened all-reduce, in place.

    A parameter no loss reached (a critic that is never run, ``value_coef: 0``) keeps its ``None``
    grad, as on one process: a zero grad would still be weight-decayed by AdamW. Which parameters
    have a grad travels in the same all-reduce (a flag per parameter), so a grad that exists on some
    ranks only is averaged with zeros rather than left out. Every rank must pass the same
    parameters in the same order.
    """
    if world_size <= 1:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = mean_over_ranks(torch.cat([g.reshape(-1) for g in grads] + [present]), world_size)
    anywhere = flat[-len(params) :] > 0
    offset = 0
    for p, reached in zip(params, anywhere.tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if reached else None
        offset += n
