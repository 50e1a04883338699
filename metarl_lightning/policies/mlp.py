"""Gaussian MLP actor-critic: the stateless baseline policy."""

from __future__ import annotations

import torch
from torch import nn

from metarl_lightning.policies.acting import (
    ActingOutput,
    NativeActingStep,
    apply_linear,
    prepare_linear,
    select_sequence_state,
)
from metarl_lightning.policies.base import ActorCritic, PolicyOutput, bounded_action_mean


def _mlp(in_dim: int, hidden_dim: int, num_layers: int, out_dim: int, out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers):
        linear = nn.Linear(width, hidden_dim)
        nn.init.orthogonal_(linear.weight, gain=2**0.5)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
        width = hidden_dim
    head = nn.Linear(width, out_dim)
    # Small output gains (cleanrl / "What matters in on-policy RL"): the initial policy is close to
    # the action prior and the initial value close to zero.
    nn.init.orthogonal_(head.weight, gain=out_gain)
    nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


class MLPActingStep(NativeActingStep):
    """The MLP's rollout step: actor and critic hidden layers as one batched matmul each.

    Args:
        policy: the architecture (its parameters act when ``stacked_params`` is None).
        stacked_params: name -> ``[K, *shape]``, or ``None``.
        num_agents: ``K``.
        envs_per_agent: ``E``.
        with_values: also run the critic (else ``value`` is ``None``).
    """

    def __init__(
        self,
        policy: MLPActorCritic,
        stacked_params: dict[str, torch.Tensor] | None,
        num_agents: int,
        envs_per_agent: int,
        with_values: bool = True,
    ) -> None:
        super().__init__(policy, stacked_params, num_agents, envs_per_agent)
        sets = self.sets
        self.nets = ("actor.", "critic.") if with_values else ("actor.",)
        # Sequential indices: Linear at 0, 2, ..., head at 2 * num_layers (Tanh in between).
        self.hidden = [
            prepare_linear(sets.stack(self.nets, f"{2 * i}.weight"), sets.stack(self.nets, f"{2 * i}.bias"))
            for i in range(policy.num_layers)
        ]  # each ([G K', 1, H], [G K', in, H]), G = 2 (actor, critic) or 1 (actor)
        head = 2 * policy.num_layers
        self.action_head = prepare_linear(sets.get(f"actor.{head}.weight"), sets.get(f"actor.{head}.bias"))
        self.value_head = prepare_linear(sets.get(f"critic.{head}.weight"), sets.get(f"critic.{head}.bias"))

    def initial_state(self, state: torch.Tensor | None = None) -> torch.Tensor:
        """Width-0 state ``[K, E, 0]`` (a stateless policy has nothing to start from)."""
        return torch.zeros(self.num_agents, self.envs_per_agent, 0, dtype=self.dtype, device=self.device)

    def select_state(self, mask: torch.Tensor, where_true: torch.Tensor, where_false: torch.Tensor) -> torch.Tensor:
        """See :class:`~metarl_lightning.policies.acting.ActingStep` (width 0: nothing to select)."""
        return select_sequence_state(mask, where_true, where_false)

    def __call__(self, obs: torch.Tensor, state: torch.Tensor, reset: torch.Tensor) -> ActingOutput:
        """See :class:`~metarl_lightning.policies.acting.ActingStep`; ``reset`` is unused."""
        K, E, D = obs.shape
        x = obs.reshape(self.num_sets, -1, D)  # (K', M, D)
        if self.hidden:
            if len(self.nets) == 2:
                x = torch.cat([x, x])  # (2K', M, D): actor sets, then critic sets (cat: 10x cheaper than repeat)
            for layer in self.hidden:
                x = torch.tanh(apply_linear(x, layer))  # (G K', M, H)
        features = x.chunk(len(self.nets)) if self.hidden else (x, x)
        mean = bounded_action_mean(apply_linear(features[0], self.action_head))  # (K', M, A)
        value = None if len(self.nets) == 1 else apply_linear(features[-1], self.value_head).reshape(K, E)
        return ActingOutput(mean.reshape(K, E, -1), self.log_std, value, state)


class MLPActorCritic(ActorCritic):
    """Separate tanh MLPs for the action mean and the value; state-independent log-std.

    Args:
        observation_dim: size of the observation vector (linked from the data module).
        action_dim: size of the action vector (linked from the data module).
        hidden_dim: width of every hidden layer.
        num_layers: hidden layers per network.
        init_log_std: initial log standard deviation of the Gaussian.
    """

    acting_step_class = MLPActingStep

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden_dim: int = 64,
        num_layers: int = 2,
        init_log_std: float = -0.5,
    ) -> None:
        super().__init__()
        self.observation_dim = observation_dim
        self.action_dim = action_dim
        self.num_layers = num_layers
        self.actor = _mlp(observation_dim, hidden_dim, num_layers, action_dim, out_gain=0.01)
        self.critic = _mlp(observation_dim, hidden_dim, num_layers, 1, out_gain=1.0)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def action_head_names(self) -> list[str]:
        """The actor's last linear layer and the log-std."""
        head = 2 * self.num_layers
        return [f"actor.{head}.weight", f"actor.{head}.bias", "log_std"]

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """A stateless policy carries a width-0 state so callers need no special case."""
        return torch.zeros(batch_size, 0, device=device)

    def forward(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> PolicyOutput:
        """See :meth:`ActorCritic.forward`; ``state`` and ``resets`` are passed through unused."""
        mean = bounded_action_mean(self.actor(observations))  # (B, T, A)
        value = self.critic(observations).squeeze(-1)  # (B, T)
        return PolicyOutput(mean, self.log_std.expand_as(mean), value, state)

    def forward_actor(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> PolicyOutput:
        """The actor alone (:meth:`ActorCritic.forward_actor`): ``value`` is zeros."""
        mean = bounded_action_mean(self.actor(observations))
        return PolicyOutput(mean, self.log_std.expand_as(mean), mean.new_zeros(mean.shape[:-1]), state)

    def values(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
        """The critic alone, ``[B, T]``."""
        return self.critic(observations).squeeze(-1)
