"""Apply one policy module with many parameter sets at once (one set per task-agent)."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call, vmap

from metarl_lightning.policies.base import ActorCritic, PolicyOutput


def batched_policy_forward(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor],
    observations: torch.Tensor,
    state: torch.Tensor,
    resets: torch.Tensor,
    actor_only: bool = False,
) -> PolicyOutput:
    """Run agent ``k``'s parameters on agent ``k``'s inputs, for all ``K`` agents in one vmapped call.

    Args:
        policy: the module whose architecture is used (its own parameters are ignored).
        stacked_params: name -> ``[K, *shape]``.
        observations: ``[K, B, T, D]``.
        state: ``[K, B, *S]``.
        resets: ``[K, B, T]`` bool.
        actor_only: run :meth:`ActorCritic.forward_actor` (``value`` is zeros, the critic skipped).

    Returns:
        :class:`PolicyOutput` with a leading ``K`` on every field.
    """
    module = _MethodOf(policy, "forward_actor") if actor_only else policy
    prefix = "policy." if actor_only else ""

    def one_agent(params: dict[str, torch.Tensor], obs: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> PolicyOutput:
        return functional_call(module, {f"{prefix}{name}": p for name, p in params.items()}, (obs, h, r))

    return vmap(one_agent)(stacked_params, observations, state, resets)


class _MethodOf(torch.nn.Module):
    """A policy method as a module's ``forward``, so ``functional_call`` can swap its parameters."""

    def __init__(self, policy: ActorCritic, method: str) -> None:
        super().__init__()
        self.policy = policy
        self.method = method

    def forward(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> Any:
        return getattr(self.policy, self.method)(observations, state, resets)


def batched_policy_values(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor],
    observations: torch.Tensor,
    state: torch.Tensor,
    resets: torch.Tensor,
) -> torch.Tensor:
    """:func:`batched_policy_forward` for ``ActorCritic.values`` (the critic alone): ``[K, B, T]``."""
    values_of = _MethodOf(policy, "values")

    def one_agent(params: dict[str, torch.Tensor], obs: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return functional_call(values_of, {f"policy.{name}": p for name, p in params.items()}, (obs, h, r))

    return vmap(one_agent)(stacked_params, observations, state, resets)
