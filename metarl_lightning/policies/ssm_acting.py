"""The SSM actor-critic's rollout step: parameters folded once per rollout, agents batched by matmul.

Per env step the S5 step of :class:`~metarl_lightning.policies.ssm_actor_critic.S5Block` is, for each
block, ``n = LayerNorm(x)``, ``h = lam_bar h + B_bar n``, ``y = [Re h, Im h] C + D n``,
``x = x + GLU(GELU(y))``. Everything that depends on parameters only is done here once per
rollout instead of once per step:

* ZOH discretisation (``lam_bar``, ``B_bar``),
* the LayerNorm affines, folded into the matmul after them (``B_bar``, ``D`` and the heads),
* actor and critic trunks stacked as parameter sets of one batched matmul (their inputs are the
  same observations), so each layer costs its ops once, not once per trunk.

That leaves 9 tensor ops and 2 views per block per step for all agents and trunks (timed in
``benchmarks/bench_ssm.py``; with ``with_values=False`` only the actor trunk runs). In the collector
each op costs ~15 us, mostly cache misses (README, "Benchmarks"), so the op count is the cost. The
state is kept complex, one ``[G * K', M, N]`` tensor per block (a tuple: no stack and unbind per
step), the layout the step consumes, so no per-step conversions are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from metarl_lightning.policies.acting import (
    ActingOutput,
    NativeActingStep,
    ParameterSets,
    apply_linear,
    fold_affine_into_linear,
    prepare_linear,
)
from metarl_lightning.policies.base import bounded_action_mean, state_dependent_log_std
from metarl_lightning.policies.ssm import discretize

if TYPE_CHECKING:
    from metarl_lightning.policies.ssm_actor_critic import SSMActorCritic


class _FoldedBlock:
    """One S5 block's per-rollout constants for ``P`` parameter sets.

    Args:
        sets: the rollout's parameters.
        trunks: parameter-name prefixes of the stacked trunks.
        prefix: the block's name inside a trunk, e.g. ``"blocks.0."``.
    """

    def __init__(self, sets: ParameterSets, trunks: tuple[str, ...], prefix: str) -> None:
        def stack(name: str) -> torch.Tensor:
            return sets.stack(trunks, prefix + name)

        norm_scale, norm_shift = stack("norm.weight"), stack("norm.bias")  # (P, H)
        lam_bar, input_scale = discretize(stack("ssm.Lambda"), stack("ssm.log_step"))  # (P, N)
        b_bar = torch.view_as_complex(stack("ssm.B").contiguous()) * input_scale.unsqueeze(-2)  # (P, H, N)
        # B_bar (scale * n + shift) = (diag(scale) B_bar) n + B_bar^T shift, in real/imag pairs.
        folded_b = norm_scale.unsqueeze(-1) * b_bar  # (P, H, N)
        folded_b_bias = torch.einsum("ph,phn->pn", norm_shift.to(b_bar.dtype), b_bar)  # (P, N)
        self.input = (
            torch.view_as_real(folded_b_bias).flatten(-2).unsqueeze(-2),  # (P, 1, 2N)
            torch.view_as_real(folded_b).flatten(-2).contiguous(),  # (P, H, 2N)
        )
        self.lam_bar = lam_bar.unsqueeze(-2)  # (P, 1, N)
        d = stack("ssm.D")  # (P, H)
        # y = [Re h, Im h] C + D (scale * n + shift) = ([Re h, Im h] C + D shift) + (D scale) n.
        self.output = ((d * norm_shift).unsqueeze(-2), stack("ssm.C").flatten(1, 2).contiguous())  # (P,1,H), (P,2N,H)
        self.feedthrough = (d * norm_scale).unsqueeze(-2)  # (P, 1, H)
        self.glu = prepare_linear(stack("glu.weight"), stack("glu.bias"))
        self.real_dtype, self.complex_dtype = d.dtype, lam_bar.dtype

    def __call__(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(P, M, H)`` real, ``h`` ``(P, M, N)`` complex -> next ``x`` and ``h``."""
        n = F.layer_norm(x, x.shape[-1:])  # affine folded into the constants
        # Real/imag pairs <-> complex by reinterpreting the contiguous last dim: one view op each.
        bu = apply_linear(n, self.input).view(self.complex_dtype)  # (P, M, 2N) real -> (P, M, N)
        h = torch.addcmul(bu, self.lam_bar, h)  # (P, M, N)
        y = torch.addcmul(apply_linear(h.view(self.real_dtype), self.output), self.feedthrough, n)
        return x + F.glu(apply_linear(F.gelu(y), self.glu), dim=-1), h  # value * sigmoid(gate): one op


class SSMActingStep(NativeActingStep):
    """Rollout step of :class:`~metarl_lightning.policies.ssm_actor_critic.SSMActorCritic`.

    Args:
        policy: the architecture (its parameters act when ``stacked_params`` is None).
        stacked_params: name -> ``[K, *shape]``, or ``None``.
        num_agents: ``K``.
        envs_per_agent: ``E``.
        with_values: also run the critic (its trunk and the value head); else ``value`` is ``None``.
    """

    def __init__(
        self,
        policy: SSMActorCritic,
        stacked_params: dict[str, torch.Tensor] | None,
        num_agents: int,
        envs_per_agent: int,
        with_values: bool = True,
    ) -> None:
        super().__init__(policy, stacked_params, num_agents, envs_per_agent)
        sets = self.sets
        self.with_values = with_values
        separate_critic = policy.critic_trunk is not None and with_values
        self.trunks = ("actor_trunk.", "critic_trunk.") if separate_critic else ("actor_trunk.",)
        self.encoder = prepare_linear(sets.stack(self.trunks, "encoder.weight"), sets.stack(self.trunks, "encoder.bias"))
        self.blocks = [_FoldedBlock(sets, self.trunks, f"blocks.{i}.") for i in range(policy.num_layers)]
        # The output LayerNorm's affine goes into the heads: actor sets first, critic sets last.
        out_scale = sets.stack(self.trunks, "out_norm.weight").unflatten(0, (len(self.trunks), -1))  # (G, K', H)
        out_shift = sets.stack(self.trunks, "out_norm.bias").unflatten(0, (len(self.trunks), -1))
        self.action_head = prepare_linear(
            *fold_affine_into_linear(out_scale[0], out_shift[0], sets.get("action_head.weight"), sets.get("action_head.bias"))
        )
        self.log_std_head = None
        if policy.log_std_head is not None:
            self.log_std_head = prepare_linear(
                *fold_affine_into_linear(out_scale[0], out_shift[0], sets.get("log_std_head.weight"), sets.get("log_std_head.bias"))
            )
        self.value_head = prepare_linear(
            *fold_affine_into_linear(out_scale[-1], out_shift[-1], sets.get("value_head.weight"), sets.get("value_head.bias"))
        ) if with_values else None
        self.num_modes = policy.num_modes

    def initial_state(self, state: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Complex state, one ``[G * K', M, N]`` tensor per block: zeros, or ``state``.

        ``state`` is the sequence layout ``[K, E, trunks * L, N, 2]`` (real/imag pairs, the actor
        trunk's blocks first, then the critic's), as ``SSMActorCritic.forward`` returns it.
        """
        sets = len(self.trunks) * self.num_sets
        envs = self.num_agents * self.envs_per_agent // self.num_sets
        complex_dtype = torch.promote_types(self.dtype, torch.complex64)  # float64 -> complex128
        if state is None:
            return tuple(torch.zeros(sets, envs, self.num_modes, dtype=complex_dtype, device=self.device) for _ in self.blocks)
        L = len(self.blocks)
        flat = state.to(self.dtype).reshape(self.num_agents * self.envs_per_agent, -1, self.num_modes, 2)
        # Env index k * E + e is row k' * M + m of both layouts (K' = K, M = E; or K' = 1, M = K * E).
        return tuple(
            torch.stack([torch.view_as_complex(flat[:, g * L + i].contiguous()) for g in range(len(self.trunks))])
            .reshape(sets, envs, self.num_modes)
            for i in range(L)
        )

    def select_state(
        self, mask: torch.Tensor, where_true: tuple[torch.Tensor, ...], where_false: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        """See :class:`~metarl_lightning.policies.acting.ActingStep`: env ``k * E + e`` is row
        ``k' * M + m`` of every trunk's ``[K', M, N]`` block, as in the reset masking below."""
        keep = mask.reshape(1, self.num_sets, -1, 1)  # (1, K', M, 1)
        groups = (len(self.trunks), self.num_sets)
        return tuple(
            torch.where(keep, a.unflatten(0, groups), b.unflatten(0, groups)).flatten(0, 1)
            for a, b in zip(where_true, where_false)
        )

    def __call__(self, obs: torch.Tensor, state: tuple[torch.Tensor, ...], reset: torch.Tensor) -> ActingOutput:
        """See :class:`~metarl_lightning.policies.acting.ActingStep`."""
        K, E, D = obs.shape
        if reset.any():  # episode starts only: skip the masking on every other step
            keep = (~reset).to(self.dtype).reshape(1, self.num_sets, -1, 1)  # (1, K', M, 1)
            groups = (len(self.trunks), self.num_sets)
            state = tuple((h.unflatten(0, groups) * keep).flatten(0, 1) for h in state)
        x = obs.reshape(self.num_sets, -1, D)
        x = torch.cat([x] * len(self.trunks)) if len(self.trunks) > 1 else x  # (P, M, D)
        x = F.gelu(apply_linear(x, self.encoder))  # (P, M, H)
        new_state = []
        for block, h in zip(self.blocks, state):
            x, h = block(x, h)
            new_state.append(h)
        features = F.layer_norm(x, x.shape[-1:])  # (G K', M, H)
        features = features.chunk(len(self.trunks)) if len(self.trunks) > 1 else (features,)  # (K', M, H) per trunk
        mean = bounded_action_mean(apply_linear(features[0], self.action_head))  # (K', M, A)
        value = apply_linear(features[-1], self.value_head).reshape(K, E) if self.with_values else None
        log_std = self.log_std
        if self.log_std_head is not None:  # (K', M, A), per step
            log_std = state_dependent_log_std(self.log_std, apply_linear(features[0], self.log_std_head), mean).reshape(K, E, -1)
        return ActingOutput(mean.reshape(K, E, -1), log_std, value, tuple(new_state))
