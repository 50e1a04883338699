"""State values of a finished rollout in one sequence forward, so the critic leaves the per-step path.

While acting, only the actor is needed; GAE needs the critic's value of every visited observation,
of the final observation of every episode cut by the time limit (the bootstrap), and of the
observation after the last step. All of these are computed here after the rollout with the
policy's sequence path (the parallel scan for the SSM), which costs about one training forward
instead of one critic call per env step.

For a recurrent critic the bootstrap value needs the state right after the cut step, so each
truncated step's final observation is *inserted* into the sequence right after it. That is exact
when the state resets at every episode start (``reset_state_on: episode``): the step after the
inserted one is a reset, so the inserted observation never leaks into the next episode. With
``reset_state_on: trial`` the collector keeps the critic in the acting step instead.
"""

from __future__ import annotations

import torch

from metarl_lightning.policies.base import ActorCritic
from metarl_lightning.policies.functional import batched_policy_values


def sequence_values(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor] | None,
    observations: torch.Tensor,
    initial_state: torch.Tensor,
    resets: torch.Tensor,
) -> torch.Tensor:
    """Critic values ``[K, E, T]`` of ``[K, E, T, D]`` sequences (``ActorCritic.values``: the critic
    alone), with per-agent parameters (vmap over agents) or shared ones."""
    if stacked_params is not None:
        return batched_policy_values(policy, stacked_params, observations, initial_state, resets)
    K, E, T = resets.shape
    return policy.values(observations.flatten(0, 1), initial_state.flatten(0, 1), resets.flatten(0, 1)).reshape(K, E, T)


def rollout_values(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor] | None,
    observations: torch.Tensor,
    resets: torch.Tensor,
    truncated: torch.Tensor,
    final_observations: torch.Tensor,
    last_observation: torch.Tensor,
    last_reset: torch.Tensor,
    initial_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values of a rollout whose recurrent state resets at every episode start.

    Args:
        policy: the architecture; its own parameters when ``stacked_params`` is None.
        stacked_params: name -> ``[K, *shape]``, or ``None``.
        observations: ``[K, E, T, D]`` observations acted on.
        resets: ``[K, E, T]`` bool; must be true at the step after every truncation.
        truncated: ``[K, E, T]`` bool, episode cut by the time limit after step ``t``.
        final_observations: ``[K, E, T, D]``, the last observation of the episode cut at ``t``
            (read where ``truncated`` only).
        last_observation: ``[K, E, D]``, the observation after the last step.
        last_reset: ``[K, E]`` bool, whether the state resets before ``last_observation``.
        initial_state: ``[K, E, *S]`` state before step 0.

    Returns:
        ``values [K, E, T]``, ``truncation_values [K, E, T]`` (the final observation's value where
        truncated, 0 elsewhere) and ``last_value [K, E]``.
    """
    K, E, T, D = observations.shape
    device = observations.device
    counts = truncated.long()
    # Real step t moves right by the number of final observations inserted before it.
    position = torch.arange(T, device=device) + counts.cumsum(-1) - counts  # (K, E, T)
    last_position = T + counts.sum(-1)  # (K, E): after the last real step and its insertion
    length = int(last_position.max()) + 1
    extended = observations.new_zeros(K, E, length, D)
    extended_resets = torch.ones(K, E, length, dtype=torch.bool, device=device)  # padding: isolated
    extended.scatter_(2, position.unsqueeze(-1).expand(-1, -1, -1, D), observations)
    extended_resets.scatter_(2, position, resets)
    k, e, t = truncated.nonzero(as_tuple=True)
    extended[k, e, position[k, e, t] + 1] = final_observations[k, e, t]
    extended_resets[k, e, position[k, e, t] + 1] = False  # continues the cut episode's state
    agent, env = torch.meshgrid(torch.arange(K, device=device), torch.arange(E, device=device), indexing="ij")
    extended[agent, env, last_position] = last_observation
    extended_resets[agent, env, last_position] = last_reset

    value = sequence_values(policy, stacked_params, extended, initial_state, extended_resets)  # (K, E, L)
    values = value.gather(2, position)
    after = value.gather(2, position + 1)  # position + 1 <= last_position < length
    truncation_values = torch.where(truncated, after, torch.zeros_like(after))
    last_value = value.gather(2, last_position.unsqueeze(-1)).squeeze(-1)
    return values, truncation_values, last_value
