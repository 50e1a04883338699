"""Acting steps: the policy's rollout path, prepared once per rollout and called once per env step.

A rollout runs the policy once per environment step for ``K`` agents x ``E`` envs, on tensors of a
few hundred rows: each tensor op costs microseconds of dispatch, and with per-agent weights the
arithmetic of small batched matmuls adds to it (measured in ``benchmarks/bench_ssm.py``). The
generic path below (``vmap`` over ``functional_call``) works for any
:class:`~metarl_lightning.policies.base.ActorCritic` but pays ~500 us per call for vmap's batching
rules and parameter swapping. A policy can instead name its own :class:`ActingStep` class
(``ActorCritic.acting_step_class``, usually a :class:`NativeActingStep`) that

* does every parameter-only computation once per rollout (SSM discretisation, folding LayerNorm
  affines into the next matmul, transposes), and
* applies ``K`` parameter sets with batched matmuls (``torch.baddbmm`` over a leading
  parameter-set dim) instead of vmap, with actor and critic stacked into the same batch.

Equality with ``forward`` (per-agent and shared parameters, with resets) is tested for every
native step in ``tests/test_acting.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from metarl_lightning.policies.functional import batched_policy_forward

if TYPE_CHECKING:
    from metarl_lightning.policies.base import ActorCritic


class ActingOutput(NamedTuple):
    """One acting step of ``K`` agents x ``E`` envs.

    Attributes:
        mean: Gaussian action mean, ``[K, E, A]``.
        log_std: log standard deviation, broadcastable to ``[K, E, A]``.
        value: state-value estimate, ``[K, E]``; ``None`` from a step built ``with_values=False``.
        state: the step's recurrent state after this step, in the step's own layout.
    """

    mean: torch.Tensor
    log_std: torch.Tensor
    value: torch.Tensor | None
    state: Any


class ActingStep(Protocol):
    """What a collector calls once per env step (no autograd; parameters fixed for the rollout).

    The recurrent state is opaque to the caller: a step may keep it in whatever layout makes its
    step cheapest. A rollout starts from the zero state, or from a state in the policy's sequence
    layout (``PolicyOutput.state``, e.g. where the support trials ended), which is what training
    starts its recomputation from.
    """

    def initial_state(self, state: torch.Tensor | None = None) -> Any:
        """Start state for ``K x E`` envs in this step's layout: zeros, or ``state`` ``[K, E, *S]``
        given in the policy's sequence layout (``ActorCritic.initial_state`` / ``PolicyOutput.state``)."""

    def __call__(self, obs: torch.Tensor, state: Any, reset: torch.Tensor) -> ActingOutput:
        """Act on ``obs`` ``[K, E, D]``; ``reset`` ``[K, E]`` bool zeroes the state first."""

    def select_state(self, mask: torch.Tensor, where_true: Any, where_false: Any) -> Any:
        """Per env, ``where_true``'s state where ``mask`` ``[K, E]`` is set, else ``where_false``'s
        (both in this step's layout; e.g. restoring a saved state for the envs starting an episode)."""


def select_sequence_state(mask: torch.Tensor, where_true: torch.Tensor, where_false: torch.Tensor) -> torch.Tensor:
    """:meth:`ActingStep.select_state` for states in the sequence layout ``[K, E, *S]``."""
    keep = mask.reshape(*mask.shape, *([1] * (where_true.dim() - mask.dim())))
    return torch.where(keep, where_true, where_false)


class GenericActingStep:
    """Any policy through its ``forward`` with ``T == 1``: vmap over agents, or one plain call.

    It always computes values (``forward`` does); callers that do not need them ignore them.

    Args:
        policy: the architecture; its own parameters act when ``stacked_params`` is None.
        stacked_params: name -> ``[K, *shape]`` per-agent parameters, or ``None``.
        num_agents: ``K``.
        envs_per_agent: ``E``.
    """

    def __init__(
        self,
        policy: ActorCritic,
        stacked_params: dict[str, torch.Tensor] | None,
        num_agents: int,
        envs_per_agent: int,
    ) -> None:
        self.policy, self.stacked_params = policy, stacked_params
        self.num_agents, self.envs_per_agent = num_agents, envs_per_agent
        reference = next(iter((stacked_params or dict(policy.named_parameters())).values()))
        self.device, self.dtype = reference.device, reference.dtype

    def initial_state(self, state: torch.Tensor | None = None) -> torch.Tensor:
        """``policy.initial_state`` as ``[K, E, *S]`` (this step's layout is the sequence layout)."""
        if state is not None:
            return state.to(self.dtype).clone()
        K, E = self.num_agents, self.envs_per_agent
        state = self.policy.initial_state(K * E, device=self.device).to(self.dtype)
        return state.reshape(K, E, *state.shape[1:])

    def __call__(self, obs: torch.Tensor, state: torch.Tensor, reset: torch.Tensor) -> ActingOutput:
        """See :class:`ActingStep`."""
        K, E = obs.shape[:2]
        if self.stacked_params is None:
            # Every agent acts with theta: one plain forward over all K * E envs (no vmap).
            flat = self.policy(obs.reshape(K * E, 1, -1), state.reshape(K * E, *state.shape[2:]), reset.reshape(K * E, 1))
            return ActingOutput(
                mean=flat.mean.reshape(K, E, -1),
                log_std=flat.log_std.expand_as(flat.mean).reshape(K, E, -1),
                value=flat.value.reshape(K, E),
                state=flat.state.reshape(K, E, *flat.state.shape[1:]),
            )
        out = batched_policy_forward(self.policy, self.stacked_params, obs.unsqueeze(2), state, reset.unsqueeze(2))
        return ActingOutput(out.mean[:, :, 0], out.log_std.expand_as(out.mean)[:, :, 0], out.value[:, :, 0], out.state)

    def select_state(self, mask: torch.Tensor, where_true: torch.Tensor, where_false: torch.Tensor) -> torch.Tensor:
        """See :class:`ActingStep` (this step's layout is the sequence layout)."""
        return select_sequence_state(mask, where_true, where_false)


class ParameterSets:
    """Parameters of one rollout as ``P = G x K'`` parameter sets for batched matmuls.

    ``G`` stacks same-shaped sub-networks that read the same input (actor and critic trunks), ``K'``
    is ``K`` with per-agent parameters or 1 with shared ``theta``. Inputs are laid out to match:
    ``[G * K', M, features]`` with ``M = E`` (per-agent) or ``K * E`` (shared).

    Args:
        params: name -> tensor (``[K, *shape]`` when ``per_agent``, else ``[*shape]``).
        per_agent: whether ``params`` carry the agent dim.
    """

    def __init__(self, params: dict[str, torch.Tensor], per_agent: bool) -> None:
        self.params = params if per_agent else {name: p.unsqueeze(0) for name, p in params.items()}

    def stack(self, prefixes: tuple[str, ...], name: str) -> torch.Tensor:
        """``params[prefix + name]`` of each prefix stacked: ``[G * K', *shape]``."""
        return torch.stack([self.params[prefix + name] for prefix in prefixes]).flatten(0, 1)

    def get(self, name: str) -> torch.Tensor:
        """One parameter, ``[K', *shape]``."""
        return self.params[name]


class NativeActingStep:
    """What the native acting steps share: the rollout's :class:`ParameterSets` and log-std.

    Args:
        policy: the architecture; its own parameters act when ``stacked_params`` is None (every
            agent acts with theta: one parameter set, ``K' = 1``).
        stacked_params: name -> ``[K, *shape]`` per-agent parameters, or ``None``.
        num_agents: ``K``.
        envs_per_agent: ``E``.

    Attributes:
        sets: the parameters as :class:`ParameterSets`.
        num_sets: ``K'``.
        log_std: ``[K', 1, A]``, broadcasts against ``[K, E, A]`` (a state-independent parameter).
    """

    def __init__(
        self,
        policy: ActorCritic,
        stacked_params: dict[str, torch.Tensor] | None,
        num_agents: int,
        envs_per_agent: int,
    ) -> None:
        per_agent = stacked_params is not None
        self.sets = ParameterSets(stacked_params if per_agent else dict(policy.named_parameters()), per_agent)
        self.num_agents, self.envs_per_agent = num_agents, envs_per_agent
        self.num_sets = num_agents if per_agent else 1
        log_std = self.sets.get("log_std")  # (K', A)
        self.log_std = log_std.unsqueeze(1)  # (K', 1, A)
        self.dtype, self.device = log_std.dtype, log_std.device


def prepare_linear(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias [P, 1, out], weight^T [P, in, out])`` for :func:`apply_linear` from ``[P, out, in]``, ``[P, out]``."""
    return bias.unsqueeze(-2), weight.transpose(-1, -2).contiguous()


def apply_linear(x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x @ W^T + b`` per parameter set in one op: ``x`` ``[P, M, in]`` -> ``[P, M, out]``."""
    bias, weight_t = prepared
    return torch.baddbmm(bias, x, weight_t)


def fold_affine_into_linear(
    scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Linear(scale * n + shift)`` as ``Linear'(n)``: saves the affine op of a LayerNorm per step.

    Args:
        scale, shift: ``[P, in]`` (a LayerNorm's weight and bias).
        weight: ``[P, out, in]``; bias: ``[P, out]``.

    Returns:
        ``(weight * scale, bias + weight @ shift)`` shaped like ``weight`` and ``bias``.
    """
    return weight * scale.unsqueeze(-2), bias + (weight @ shift.unsqueeze(-1)).squeeze(-1)
