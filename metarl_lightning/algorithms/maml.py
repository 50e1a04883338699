"""The MAML inner update (Finn et al. 2017) on parameter dictionaries.

Parameters are plain dicts of tensors so the ``nn.Parameter`` objects of the module stay the
meta-parameters and the adapted ones are ordinary tensors in the same autograd graph. For a batch of
task-agents, pass parameters stacked along a leading agent dimension (``theta.expand(K, ...)``) and a
loss that sums the per-agent losses: agent ``k``'s loss depends only on slice ``k``, so one
``autograd.grad`` call yields every agent's own gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

Params = dict[str, torch.Tensor]


def sgd_step(params: Params, grads: tuple[torch.Tensor, ...], inner_lr: float | Params) -> Params:
    """``theta' = theta - inner_lr * grad`` for every entry (same order as ``params``).

    ``inner_lr`` is one float, or a step size per parameter (Meta-SGD, Li et al. 2017): name ->
    tensor broadcastable to that parameter (e.g. its own shape against ``[K, *shape]`` stacks).
    """
    if isinstance(inner_lr, dict):
        return {name: p - inner_lr[name] * g for (name, p), g in zip(params.items(), grads)}
    return {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}


def inner_update(
    params: Params,
    loss_fn: Callable[[Params], torch.Tensor],
    inner_lr: float | Params,
    inner_steps: int,
    first_order: bool,
) -> Params:
    """Adapt ``params`` with ``inner_steps`` steps of gradient descent on ``loss_fn``.

    Second order (``first_order=False``) keeps the graph of every inner gradient
    (``create_graph=True``), so an outer loss of the adapted parameters back-propagates through the
    Hessian-vector products. First order treats the inner gradients as constants: the meta-gradient
    is then the outer gradient evaluated at the adapted parameters (FOMAML).

    Args:
        params: name -> tensor; they must require grad (or descend from tensors that do).
        loss_fn: maps a parameter dict to a scalar loss.
        inner_lr: step size alpha (>= 0), or per-parameter step sizes (see :func:`sgd_step`); learned
            step sizes get their meta-gradient through ``theta' = theta - alpha * g`` in either order.
        inner_steps: number of steps (>= 0; 0 returns ``params`` unchanged).
        first_order: drop second-order terms.

    Returns:
        The adapted parameters, same keys and shapes.
    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    adapted = params
    for _ in range(inner_steps):
        loss = loss_fn(adapted)
        grads = torch.autograd.grad(
            loss, tuple(adapted.values()), create_graph=not first_order, allow_unused=True
        )
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(adapted.values(), grads))
        if first_order:
            grads = tuple(g.detach() for g in grads)
        adapted = sgd_step(adapted, grads, inner_lr)
    return adapted


def stack_for_agents(params: Params, num_agents: int) -> Params:
    """View every parameter as ``[num_agents, *shape]`` (no copy; gradients flow back summed)."""
    return {name: p.unsqueeze(0).expand(num_agents, *p.shape) for name, p in params.items()}


def agent_chunks(num_agents: int, chunk_size: int | None) -> list[slice]:
    """Consecutive agent ranges of at most ``chunk_size`` (``None``: one range of all agents).

    The meta-loss is a mean over agents, each agent's term depending only on its own adapted
    parameters, so ``sum_c (|c| / K) * grad L_c`` over these ranges equals the full gradient: the
    graph of one range at a time is what a backward has to hold.
    """
    if chunk_size is None or chunk_size >= num_agents:
        return [slice(0, num_agents)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    return [slice(start, min(start + chunk_size, num_agents)) for start in range(0, num_agents, chunk_size)]
