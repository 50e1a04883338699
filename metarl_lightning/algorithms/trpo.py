"""A KL-constrained (TRPO) step: natural-gradient direction by conjugate gradient, then a line search.

Schulman et al. 2015, as MAML-TRPO uses it for the outer step (Finn et al. 2017; garage and the
Meta-World+ reference code). Pure torch, no Lightning: the caller passes closures for the loss
and the mean KL of the new policy from the acting one, both functions of ``params``.

Why it matters here: Adam moves every parameter by about its learning rate per step, whatever the
curvature, so the log-std barely moved under the PPO outer step (docs/results.md). The natural
gradient scales each direction by the Fisher information: for a Gaussian the log-std's Fisher is
2 per action dimension, so the step moves the std as far as the KL budget allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


def conjugate_gradient(
    matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int = 10, tolerance: float = 1e-10
) -> torch.Tensor:
    """Approximately solve ``A x = b`` for a symmetric positive definite ``A`` given by products.

    Args:
        matrix_vector: ``v -> A v`` for ``[n]`` vectors.
        b: ``[n]``.
        iterations: at most this many products (exact after ``n`` in exact arithmetic).
        tolerance: stop once the squared residual is below this.

    Returns:
        ``x`` of shape ``[n]``.
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual.dot(residual)
    for _ in range(iterations):
        if residual_sq <= tolerance:
            break
        product = matrix_vector(direction)
        alpha = residual_sq / direction.dot(product).clamp_min(1e-20)
        x = x + alpha * direction
        residual = residual - alpha * product
        new_residual_sq = residual.dot(residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def gaussian_kl(mean_p: torch.Tensor, log_std_p: torch.Tensor, mean_q: torch.Tensor, log_std_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` of diagonal Gaussians, summed over the last (action) axis.

    Shapes broadcast: means ``[..., A]``, log-stds ``[..., A]`` or ``[A]``; returns ``[...]``.
    """
    var_p, var_q = (2 * log_std_p).exp(), (2 * log_std_q).exp()
    kl = log_std_q - log_std_p + (var_p + (mean_p - mean_q).pow(2)) / (2 * var_q) - 0.5
    return kl.sum(-1)


class TRPOStep(NamedTuple):
    """What one step did (scalars, detached).

    Attributes:
        loss_before: loss at the old parameters.
        loss_after: loss at the accepted parameters (``loss_before`` when rejected).
        kl: mean KL at the accepted parameters (0 when rejected).
        step_size: the full step's scale ``sqrt(2 max_kl / s^T F s)``.
        backtracks: line-search shrinks taken.
        accepted: 1.0 when a point with lower loss and KL <= max_kl was found, else 0.0.
    """

    loss_before: torch.Tensor
    loss_after: torch.Tensor
    kl: torch.Tensor
    step_size: torch.Tensor
    backtracks: int
    accepted: float


def trpo_step(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    kl_fn: Callable[[], torch.Tensor],
    max_kl: float = 0.01,
    cg_iterations: int = 10,
    damping: float = 1e-5,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    evaluate: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> TRPOStep:
    """Minimise ``loss_fn`` subject to ``kl_fn() <= max_kl``; updates ``params`` in place.

    Direction ``s = F^{-1} g`` (conjugate gradient on Fisher-vector products, the Hessian of the KL
    at the old parameters plus ``damping``), full step ``sqrt(2 max_kl / s^T F s) s``, shrunk by
    ``backtrack_ratio`` until the loss improves and the KL is within the budget; if no shrink
    passes, the parameters are left as they were.

    Args:
        params: leaf tensors the closures depend on (``requires_grad``).
        loss_fn: the surrogate loss at the current ``params`` (with a graph to them).
        kl_fn: mean ``KL(acting policy || policy at params)``: zero, with zero gradient, at the old
            parameters; its Hessian there is the Fisher matrix.
        max_kl: the trust region.
        cg_iterations, damping: of the natural-gradient solve.
        backtrack_ratio, max_backtracks: of the line search.
        reduce: applied to every gradient, Fisher-vector product and line-search value (e.g. a
            mean over data-parallel ranks, so every rank takes the same step).
        evaluate: ``(loss, kl)`` values for the line search (``None``: both closures under
            ``torch.no_grad``); a MAML caller computes them with a first-order inner step, which
            needs autograd but no graph to keep.
    """
    params = list(params)

    def flat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        # A parameter the closure does not use (e.g. the critic in the policy's KL) has gradient 0.
        return torch.cat([torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1) for p, t in zip(params, tensors)])

    loss = loss_fn()
    g = reduce(flat(torch.autograd.grad(loss, params, allow_unused=True)))
    loss_before = reduce(loss.detach())
    flat_kl_grad = flat(torch.autograd.grad(kl_fn(), params, create_graph=True, allow_unused=True))

    def fisher_vector(v: torch.Tensor) -> torch.Tensor:
        product = torch.autograd.grad(flat_kl_grad @ v, params, retain_graph=True, allow_unused=True)
        return reduce(flat(product)) + damping * v

    # Descend the loss: the direction solves F s = -g.
    direction = conjugate_gradient(fisher_vector, -g, cg_iterations)
    curvature = direction.dot(fisher_vector(direction)).clamp_min(1e-12)
    step_size = torch.sqrt(2 * max_kl / curvature)
    old = [p.detach().clone() for p in params]
    sizes = [p.numel() for p in params]

    def assign(scale: float) -> None:
        with torch.no_grad():
            for p, start, delta in zip(params, old, torch.split(scale * step_size * direction, sizes)):
                p.copy_(start + delta.view_as(p))

    for backtrack in range(max_backtracks):
        assign(backtrack_ratio**backtrack)
        if evaluate is None:
            with torch.no_grad():
                new_loss, kl = loss_fn(), kl_fn()
        else:
            new_loss, kl = evaluate()
        new_loss, kl = reduce(new_loss.detach()), reduce(kl.detach())
        if math.isfinite(float(new_loss)) and float(kl) <= max_kl and float(new_loss) < float(loss_before):
            return TRPOStep(loss_before, new_loss, kl, step_size.detach(), backtrack, 1.0)
    assign(0.0)
    return TRPOStep(loss_before, loss_before, torch.zeros(()), step_size.detach(), max_backtracks, 0.0)
