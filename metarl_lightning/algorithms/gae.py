"""Generalised advantage estimation (Schulman et al. 2016) that keeps terminations and truncations apart.

Every Meta-World episode ends by the 500-step limit, a *truncation*: the state there is not terminal,
so its value is bootstrapped. Treating it as terminal (``done`` with no bootstrap) biases every value
target of the last steps towards zero.
"""

from __future__ import annotations

import torch


def generalized_advantage_estimate(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) along the last (time) dimension.

    ``next_values[..., t]`` is the value of the observation that follows step ``t``: ``values[..., t+1]``
    inside an episode, the value of the final observation when the episode was truncated at ``t``
    (the collector computes it before the automatic reset), and anything (ignored) when it
    terminated.

    Args:
        rewards: ``[..., T]`` rewards.
        values: ``[..., T]`` value estimates ``V(s_t)``.
        next_values: ``[..., T]`` value estimates ``V(s_{t+1})`` (see above).
        terminated: ``[..., T]`` bool, ``s_{t+1}`` is terminal: no bootstrap.
        truncated: ``[..., T]`` bool, the episode was cut at ``t``: bootstrap, but do not carry the
            advantage recursion across the boundary.
        gamma: discount factor in ``[0, 1]``.
        gae_lambda: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[..., T]``; ``returns = advantages + values`` are the
        value-function targets.
    """
    not_terminal = (~terminated).to(rewards.dtype)
    # The recursion stops at any episode boundary; only the bootstrap term depends on which kind.
    continues = (~(terminated | truncated)).to(rewards.dtype)
    deltas = rewards + gamma * next_values * not_terminal - values  # (..., T)
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[..., 0])
    for t in range(deltas.shape[-1] - 1, -1, -1):
        running = deltas[..., t] + gamma * gae_lambda * continues[..., t] * running
        advantages[..., t] = running
    return advantages, advantages + values
