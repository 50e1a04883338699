"""Apply one policy module with many parameter sets at once (one set per task-agent)."""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from metarl_lightning.policies.base import ActorCritic, PolicyOutput


def batched_policy_forward(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor],
    observations: torch.Tensor,
    state: torch.Tensor,
    resets: torch.Tensor,
) -> PolicyOutput:
    """Run agent ``k``'s parameters on agent ``k``'s inputs, for all ``K`` agents in one vmapped call.

    Args:
        policy: the module whose architecture is used (its own parameters are ignored).
        stacked_params: name -> ``[K, *shape]``.
        observations: ``[K, B, T, D]``.
        state: ``[K, B, *S]``.
        resets: ``[K, B, T]`` bool.

    Returns:
        :class:`PolicyOutput` with a leading ``K`` on every field.
    """

    def one_agent(params: dict[str, torch.Tensor], obs: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> PolicyOutput:
        return functional_call(policy, params, (obs, h, r))

    return vmap(one_agent)(stacked_params, observations, state, resets)


class _ValuesOf(torch.nn.Module):
    """``policy.values`` as a module's ``forward``, so ``functional_call`` can swap its parameters."""

    def __init__(self, policy: ActorCritic) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
        return self.policy.values(observations, state, resets)


def batched_policy_values(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor],
    observations: torch.Tensor,
    state: torch.Tensor,
    resets: torch.Tensor,
) -> torch.Tensor:
    """:func:`batched_policy_forward` for ``ActorCritic.values`` (the critic alone): ``[K, B, T]``."""
    values_of = _ValuesOf(policy)

    def one_agent(params: dict[str, torch.Tensor], obs: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return functional_call(values_of, {f"policy.{name}": p for name, p in params.items()}, (obs, h, r))

    return vmap(one_agent)(stacked_params, observations, state, resets)
