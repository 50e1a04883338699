"""Gaussian MLP actor-critic: the stateless baseline policy."""

from __future__ import annotations

import torch
from torch import nn

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


class MLPActorCritic(ActorCritic):
    """Separate tanh MLPs for the action mean and the value; state-independent log-std.

    Args:
        observation_dim: size of the observation vector (linked from the data module).
        action_dim: size of the action vector (linked from the data module).
        hidden_dim: width of every hidden layer.
        num_layers: hidden layers per network.
        init_log_std: initial log standard deviation of the Gaussian.
    """

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
        self.actor = _mlp(observation_dim, hidden_dim, num_layers, action_dim, out_gain=0.01)
        self.critic = _mlp(observation_dim, hidden_dim, num_layers, 1, out_gain=1.0)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """A stateless policy carries a width-0 state so callers need no special case."""
        return torch.zeros(batch_size, 0, device=device)

    def forward(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> PolicyOutput:
        """See :meth:`ActorCritic.forward`; ``state`` and ``resets`` are passed through unused."""
        mean = bounded_action_mean(self.actor(observations))  # (B, T, A)
        value = self.critic(observations).squeeze(-1)  # (B, T)
        return PolicyOutput(mean, self.log_std.expand_as(mean), value, state)
