"""The linear feature baseline (Duan et al. 2016, "Benchmarking Deep RL"), fitted per task.

MAML's inner step sees a task whose goal is hidden from the observation; a meta-learned critic
cannot know that goal before adaptation, so its advantages on the support rollouts carry no task
signal beyond the raw rewards. A baseline fitted by least squares on *that task's own* rollouts
can: it is the reference MAML recipe (Finn et al. 2017; garage; Meta-World+'s MAML-TRPO).

Features per step: the clipped observation, its square, the time step within the episode
``t / 100`` and its square and cube, and a constant; targets: the discounted Monte-Carlo return to
go within the episode. One ridge regression per task (leading dimension ``K``), solved in float64.
"""

from __future__ import annotations

import torch

from metarl_lightning.algorithms.gae import generalized_advantage_estimate


def episode_time_index(terminated: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Steps since the episode began, ``[..., T]`` (long); step 0 of the rollout starts an episode.

    Args:
        terminated: ``[..., T]`` bool, the episode ended at ``t`` by termination.
        truncated: ``[..., T]`` bool, the episode was cut at ``t``.
    """
    ended = terminated | truncated
    index = torch.empty(ended.shape, dtype=torch.long, device=ended.device)
    running = torch.zeros(ended.shape[:-1], dtype=torch.long, device=ended.device)
    for t in range(ended.shape[-1]):
        index[..., t] = running
        running = torch.where(ended[..., t], torch.zeros_like(running), running + 1)
    return index


def discounted_returns(rewards: torch.Tensor, episode_ends: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo return to go within each episode, ``[..., T]``; nothing is carried past an end.

    A rollout that stops mid-episode is treated as if the episode ended there (no bootstrap), as the
    reference MAML code does: with gamma 0.99 and 500-step episodes the missing tail is tiny.
    This is GAE with zero values and lambda 1, every end treated as terminal.

    Args:
        rewards: ``[..., T]``.
        episode_ends: ``[..., T]`` bool, an episode ended (terminated or truncated) at ``t``.
        gamma: discount factor.
    """
    zeros = torch.zeros_like(rewards)
    returns, _ = generalized_advantage_estimate(
        rewards, zeros, zeros, episode_ends, torch.zeros_like(episode_ends), gamma, 1.0
    )
    return returns


def baseline_features(observations: torch.Tensor, time_index: torch.Tensor) -> torch.Tensor:
    """``[obs, obs^2, t, t^2, t^3, 1]`` with ``obs`` clipped to ``[-10, 10]`` and ``t = step / 100``.

    Args:
        observations: ``[..., D]``.
        time_index: ``[...]`` steps since the episode began.

    Returns:
        ``[..., 2 D + 4]`` features in float64 (the normal equations are ill-conditioned in float32).
    """
    obs = observations.to(torch.float64).clamp(-10.0, 10.0)
    t = (time_index.to(torch.float64) / 100.0).unsqueeze(-1)
    return torch.cat([obs, obs * obs, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)


def fit_ridge(features: torch.Tensor, targets: torch.Tensor, reg_coeff: float = 1e-5, max_tries: int = 5) -> torch.Tensor:
    """Per-task ridge regression ``argmin_w |F w - y|^2 + reg |w|^2``.

    Solved by the normal equations with the regulariser raised tenfold while the solution is not
    finite (garage's recipe: constant-zero features, e.g. a hidden goal, make ``F^T F`` singular).

    Args:
        features: ``[K, N, F]``.
        targets: ``[K, N]``.
        reg_coeff: initial ridge coefficient.
        max_tries: attempts with a growing coefficient.

    Returns:
        ``[K, F]`` weights (same dtype as ``features``).
    """
    gram = features.transpose(-1, -2) @ features  # (K, F, F)
    rhs = (features.transpose(-1, -2) @ targets.unsqueeze(-1)).squeeze(-1)  # (K, F)
    eye = torch.eye(features.shape[-1], dtype=features.dtype, device=features.device)
    weights = torch.zeros_like(rhs)  # a task never solved keeps a zero baseline
    pending = torch.ones(rhs.shape[0], dtype=torch.bool, device=rhs.device)  # (K,)
    for _ in range(max_tries):
        solution, info = torch.linalg.solve_ex(gram + reg_coeff * eye, rhs)
        solved = pending & (info == 0) & torch.isfinite(solution).all(-1)  # (K,)
        weights = torch.where(solved.unsqueeze(-1), solution, weights)
        pending &= ~solved
        if not pending.any():
            break
        reg_coeff *= 10.0
    return weights


def linear_baseline_values(
    observations: torch.Tensor,
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    reg_coeff: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one linear baseline per task on its own rollouts; return its values as a critic would.

    Args:
        observations: ``[K, E, T, D]``.
        rewards: ``[K, E, T]`` (already scaled).
        terminated: ``[K, E, T]`` bool.
        truncated: ``[K, E, T]`` bool.
        gamma: discount of the regression targets.
        reg_coeff: ridge coefficient.

    Returns:
        ``(values, next_values)``, both ``[K, E, T]`` in ``rewards``' dtype: ``values[..., t]`` is the
        fitted value of step ``t`` and ``next_values[..., t]`` that of step ``t + 1`` of the same
        episode, 0 where the episode ended at ``t`` (the targets carry nothing past an end, so
        neither does the bootstrap). Feed both to GAE.
    """
    K = observations.shape[0]
    ends = terminated | truncated
    time_index = episode_time_index(terminated, truncated)  # (K, E, T)
    features = baseline_features(observations, time_index)  # (K, E, T, F)
    targets = discounted_returns(rewards.to(torch.float64), ends, gamma)  # (K, E, T)
    weights = fit_ridge(features.reshape(K, -1, features.shape[-1]), targets.reshape(K, -1), reg_coeff)  # (K, F)
    values = torch.einsum("ketf,kf->ket", features, weights).to(rewards.dtype)  # (K, E, T)
    following = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    next_values = torch.where(ends, torch.zeros_like(values), following)
    return values, next_values
