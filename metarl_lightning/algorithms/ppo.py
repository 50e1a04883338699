"""PPO losses (Schulman et al. 2017) as pure functions, plus the Gaussian policy helpers they need."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Log-density of a diagonal Gaussian, summed over the action dimension.

    Args:
        mean: ``[..., A]``.
        log_std: broadcastable to ``mean``.
        actions: ``[..., A]`` (the unclipped samples).

    Returns:
        ``[...]`` log-probabilities.
    """
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(log_std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, summed over the action dimension: ``[...]`` like ``mean[..., 0]``."""
    per_dim = (0.5 + LOG_SQRT_2PI + log_std).expand_as(mean)
    return per_dim.sum(-1)


def normalize_advantages(
    advantages: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Zero-mean, unit-variance advantages over ``dim`` (all elements when ``None``).

    Meta-learning normalises per task (over each agent's own samples) so that a task with large
    rewards does not drown the others in the meta-gradient.
    """
    if dim is None:
        return (advantages - advantages.mean()) / (advantages.std(unbiased=False) + eps)
    mean = advantages.mean(dim=dim, keepdim=True)
    std = advantages.std(dim=dim, keepdim=True, unbiased=False)
    return (advantages - mean) / (std + eps)


class PPOLoss(NamedTuple):
    """The terms of the PPO objective and the diagnostics logged with them (all scalars).

    Attributes:
        total: ``policy + value_coef * value - entropy_coef * entropy``, the quantity minimised.
        policy: clipped surrogate loss (negated objective).
        value: value loss.
        entropy: mean policy entropy.
        approx_kl: ``E[(ratio - 1) - log ratio]``, the low-variance KL(old || new) estimator.
        clip_fraction: share of samples whose ratio left ``[1 - eps, 1 + eps]``.
    """

    total: torch.Tensor
    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    approx_kl: torch.Tensor
    clip_fraction: torch.Tensor


def weighted_mean_loss(parts: list[tuple[float, PPOLoss]]) -> PPOLoss:
    """``sum_i w_i * loss_i`` field by field (chunks of one batch, ``w_i`` = their share of it)."""
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return PPOLoss(*(sum(w * getattr(loss, name) for w, loss in parts) for name in PPOLoss._fields))


def clipped_surrogate_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, clip_epsilon: float
) -> torch.Tensor:
    """``-E[min(r A, clip(r, 1 - eps, 1 + eps) A)]`` with ``r = exp(log_probs - old_log_probs)``.

    All inputs share one shape ``[...]``; returns a scalar. At ``r == 1`` its gradient is the vanilla
    policy gradient, which is what the MAML inner step on freshly collected support data uses.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    return -torch.minimum(unclipped, clipped).mean()


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor | None = None,
    clip_epsilon: float | None = None,
) -> torch.Tensor:
    """``0.5 * E[(V - R)^2]``; with ``old_values`` and ``clip_epsilon``, PPO's clipped form.

    The clipped form takes the larger of the plain and the clipped error, where the clipped value is
    ``old + clip(V - old, -eps, eps)``.
    """
    squared = (values - returns).pow(2)
    if old_values is not None and clip_epsilon is not None:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_epsilon, clip_epsilon)
        squared = torch.maximum(squared, (clipped_values - returns).pow(2))
    return 0.5 * squared.mean()


def ppo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    entropy: torch.Tensor,
    clip_epsilon: float,
    value_coef: float,
    entropy_coef: float,
    old_values: torch.Tensor | None = None,
    value_clip_epsilon: float | None = None,
    normalize: bool = True,
) -> PPOLoss:
    """The full PPO objective for one batch of samples.

    Args:
        log_probs: ``[...]`` log pi_new(a|s), differentiable.
        old_log_probs: ``[...]`` log pi_old(a|s) recorded when acting.
        advantages: ``[...]`` GAE advantages (raw; normalised here when ``normalize``).
        values: ``[...]`` V_new(s), differentiable.
        returns: ``[...]`` value targets.
        entropy: ``[...]`` per-sample policy entropy.
        clip_epsilon: PPO ratio clip.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        old_values: ``[...]`` values recorded when acting, for the clipped value loss.
        value_clip_epsilon: clip range of the value loss; ``None`` disables clipping.
        normalize: normalise advantages before the surrogate.

    Returns:
        A :class:`PPOLoss` of scalars.
    """
    if normalize:
        advantages = normalize_advantages(advantages)
    policy = clipped_surrogate_loss(log_probs, old_log_probs, advantages, clip_epsilon)
    value = value_loss(values, returns, old_values, value_clip_epsilon)
    mean_entropy = entropy.mean()
    with torch.no_grad():
        log_ratio = log_probs - old_log_probs
        approx_kl = (torch.exp(log_ratio) - 1.0 - log_ratio).mean()
        clip_fraction = ((log_ratio.exp() - 1.0).abs() > clip_epsilon).to(log_probs.dtype).mean()
    total = policy + value_coef * value - entropy_coef * mean_entropy
    return PPOLoss(total, policy, value, mean_entropy, approx_kl, clip_fraction)
