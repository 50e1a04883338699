"""Gaussian actor-critic on a GRU: the recurrent baseline for the SSM policy.

The GRU cell is written with explicit matmuls (the ``torch.nn.GRUCell`` equations) rather than
``torch.nn.GRU``: the fused module cannot zero its state in the middle of a sequence and does not go
through ``torch.func.functional_call`` under ``vmap`` with per-agent weights. Input projections are
computed for the whole sequence in one matmul; only the hidden-to-hidden part loops over time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarl_lightning.policies.base import ActorCritic, PolicyOutput, add_gaussian_heads, add_log_std_head, bounded_action_mean


class GRUActorCritic(ActorCritic):
    """Encoder, one GRU layer, Gaussian action head and value head.

    Args:
        observation_dim: size of the observation vector (the data side may append previous
            action, reward and done for RL^2-style inputs).
        action_dim: size of the action vector.
        hidden_dim: width of the encoder and the GRU state.
        init_log_std: initial value of the state-independent log standard deviation.
        state_dependent_std: add a log-std head on the GRU state (zero at the start, within +-2 of
            ``log_std``), as the Meta-World+ reference RL^2 policy's std head; see
            :class:`~metarl_lightning.policies.SSMActorCritic`.
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden_dim: int = 64,
        init_log_std: float = -0.5,
        state_dependent_std: bool = False,
    ) -> None:
        super().__init__()
        self.observation_dim = observation_dim
        self.action_dim = action_dim
        self.hidden_dim = hidden_dim
        self.encoder = nn.Linear(observation_dim, hidden_dim)
        # Same layout and init as torch.nn.GRUCell: rows are (reset, update, new) gates.
        bound = 1.0 / math.sqrt(hidden_dim)
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_dim, hidden_dim).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_dim, hidden_dim).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_dim).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_dim).uniform_(-bound, bound))
        add_gaussian_heads(self, hidden_dim, action_dim, init_log_std)
        add_log_std_head(self, hidden_dim, action_dim, state_dependent_std)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Zero state ``(batch_size, hidden_dim)``."""
        return torch.zeros(batch_size, self.hidden_dim, device=device, dtype=self.weight_hh.dtype)

    def _cell(self, gates_x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step from precomputed input gates ``(B, 3H)`` and state ``h`` ``(B, H)``."""
        gates_h = h @ self.weight_hh.T + self.bias_hh  # (B, 3H)
        xr, xz, xn = gates_x.chunk(3, dim=-1)
        hr, hz, hn = gates_h.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h  # (B, H)

    def forward(
        self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor
    ) -> PolicyOutput:
        """See :meth:`ActorCritic.forward`; ``state`` is ``(B, hidden_dim)``."""
        x = F.gelu(self.encoder(observations))  # (B, T, H)
        gates_x = x @ self.weight_ih.T + self.bias_ih  # (B, T, 3H)
        keep = (~resets).to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        h = state
        outputs = []
        # unbind: per-step views whose backward stacks rather than zero-fills full-size grads.
        for g_t, k_t in zip(gates_x.unbind(1), keep.unbind(1)):
            h = self._cell(g_t, h * k_t)  # reset zeroes the state before the step
            outputs.append(h)
        hs = torch.stack(outputs, dim=1)  # (B, T, H)
        mean = bounded_action_mean(self.action_head(hs))  # (B, T, A)
        return PolicyOutput(
            mean=mean,
            log_std=self._log_std(hs, mean),  # (B, T, A): stays broadcastable under vmap
            value=self.value_head(hs).squeeze(-1),  # (B, T)
            state=h,  # (B, H)
        )
