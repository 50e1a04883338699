"""A finished rollout of ``K`` agents x ``E`` envs x ``T`` steps, and its advantages.

What :class:`~metarl_lightning.rollouts.RolloutCollector` returns and every loss reads: the
per-step tensors, the recurrent state at the start (so training recomputes what the policy computed
while acting), and the episode statistics the logs report.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from metarl_lightning.algorithms.baselines import linear_baseline_values
from metarl_lightning.algorithms.gae import generalized_advantage_estimate
from metarl_lightning.algorithms.ppo import normalize_advantages
from metarl_lightning.trials import trial_episode_returns, value_boundaries

BaselineKind = Literal["critic", "linear"]


@dataclass
class Rollout:
    """Experience of ``K`` agents x ``E`` envs x ``T`` steps (all tensors on the learner's device).

    Attributes:
        observations: ``[K, E, T, D]``.
        actions: ``[K, E, T, A]`` unclipped Gaussian samples (what the log-probs refer to).
        log_probs: ``[K, E, T]`` log-probabilities under the acting parameters.
        values: ``[K, E, T]`` value estimates while acting.
        next_values: ``[K, E, T]`` value of the following observation (see GAE).
        rewards: ``[K, E, T]``.
        terminated: ``[K, E, T]`` bool.
        truncated: ``[K, E, T]`` bool.
        resets: ``[K, E, T]`` bool, recurrent state zeroed before step ``t`` (an episode start with
            ``reset_state_on: episode``, a trial start with ``trial``).
        initial_state: ``[K, E, *S]`` recurrent state before step 0.
        episode_return: ``[K]`` mean undiscounted return of the episodes each agent finished.
        episode_success: ``[K]`` share of those episodes with a success at any step.
        advantages: ``[K, E, T]`` GAE advantages (set by :meth:`compute_advantages`).
        returns: ``[K, E, T]`` value targets (set by :meth:`compute_advantages`).
        final_context: ``[K, E, C]`` with context inputs: what the step after the last one would
            see (the last action, reward and done flag), for a trial that goes on in another rollout.
        successes: ``[K, E, T]`` bool, Meta-World's ``info['success']`` at each step (``None`` where
            the rollout did not come from the collector, e.g. the protocol's adaptation episodes).
    """

    observations: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    next_values: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    resets: torch.Tensor
    initial_state: torch.Tensor
    episode_return: torch.Tensor
    episode_success: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    final_context: torch.Tensor | None = None
    successes: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        """Environment steps in this rollout (``K * E * T``)."""
        return self.rewards.numel()

    def agents(self, index: slice) -> Rollout:
        """The agents ``index`` of this rollout (views, no copy): every field is ``[K, ...]``."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in fields(self)})

    def envs(self, index: slice) -> Rollout:
        """The envs ``index`` of every agent (views, no copy): per-step fields are ``[K, E', ...]``;
        the per-agent episode statistics (``[K]``) are kept whole."""
        per_agent = {"episode_return", "episode_success"}
        return Rollout(
            **{
                f.name: value if value is None or f.name in per_agent else value[:, index]
                for f in fields(self)
                for value in (getattr(self, f.name),)
            }
        )

    def value_boundaries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(terminated, truncated)`` as the returns see them: cut only where the state resets.

        See :func:`value_boundaries`.
        """
        return value_boundaries(self.terminated, self.truncated, self.resets)

    def trial_episode_returns(self) -> torch.Tensor:
        """Mean return of the first, second, ... episode of the trials: ``[n]`` (see
        :func:`trial_episode_returns`)."""
        return trial_episode_returns(self.rewards, self.terminated, self.truncated, self.resets)

    def compute_advantages(
        self,
        gamma: float,
        gae_lambda: float,
        reward_scale: float = 1.0,
        baseline: BaselineKind = "critic",
        success_bonus: float = 0.0,
    ) -> None:
        """Fill ``advantages`` and ``returns`` with GAE over the time dimension.

        ``reward_scale`` multiplies the rewards first, so the value function learns scaled returns
        (``episode_return`` stays in the env's units). ``baseline`` picks the values GAE subtracts:
        the policy's critic as recorded while acting, or a linear feature baseline fitted on each
        agent's own rollout (:mod:`~metarl_lightning.algorithms.baselines`). ``success_bonus``
        (env reward units) is added to the reward of every step with a success (needs
        ``successes``); the logged returns never include it.
        """
        rewards = self.rewards
        if success_bonus:
            if self.successes is None:
                raise ValueError("compute_advantages: success_bonus needs the rollout's per-step successes")
            rewards = rewards + success_bonus * self.successes.to(rewards.dtype)
        rewards = rewards * reward_scale
        terminated, truncated = self.value_boundaries()
        if baseline == "linear":
            values, next_values = linear_baseline_values(self.observations, rewards, terminated, truncated, gamma)
        else:
            values, next_values = self.values, self.next_values
        self.advantages, self.returns = generalized_advantage_estimate(
            rewards, values, next_values, terminated, truncated, gamma, gae_lambda
        )

    def normalized_advantages(self, eps: float = 1e-8) -> torch.Tensor:
        """Advantages normalised per agent (over its ``E x T`` samples): ``[K, E, T]``."""
        assert self.advantages is not None, "call compute_advantages first"
        return normalize_advantages(self.advantages, dim=(1, 2), eps=eps)
