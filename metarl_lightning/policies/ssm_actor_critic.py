"""Gaussian actor-critic on a stack of S5 blocks (Lu et al. 2023, "Structured State Space Models
for In-Context Reinforcement Learning").

Inputs are whatever observation vector the data side builds. For RL^2-style in-context adaptation
the data side may append the previous action, reward and done flag to the env observation; the
policy just sees a longer ``observation_dim`` and needs no extra inputs.

Training runs each block's :class:`~metarl_lightning.policies.ssm.S5` with its parallel scan over the
stored sequence; rollouts call ``forward`` with ``T == 1`` and take the O(1) ``step`` path. The
collector stores the state at the start of each rollout, so both paths produce the same outputs.
The state is real: ``(B, num_layers, state_dim // 2, 2)`` (real/imag of each stored complex mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarl_lightning.policies.base import ActorCritic, PolicyOutput, add_gaussian_heads, add_log_std_head, bounded_action_mean
from metarl_lightning.policies.ssm import S5
from metarl_lightning.policies.ssm_acting import SSMActingStep


class S5Block(nn.Module):
    """Pre-norm residual block: ``x + GLU(GELU(S5(LayerNorm(x))))``.

    Args:
        d_model: channels ``H``.
        state_dim: S5 state size ``P`` (``P / 2`` complex modes stored).
    """

    def __init__(self, d_model: int, state_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ssm = S5(d_model, state_dim)
        # One matmul for value and gate of the gated linear unit.
        self.glu = nn.Linear(d_model, 2 * d_model)

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gated residual update from the SSM output ``y``; both ``(..., H)``."""
        return x + F.glu(self.glu(F.gelu(y)), dim=-1)  # value * sigmoid(gate), value first

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, resets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence path: ``x`` ``(B, T, H)``, ``h0`` ``(B, N, 2)``, ``resets`` ``(B, T)``."""
        y, h = self.ssm(self.norm(x), h0, resets)  # (B, T, H), (B, N, 2)
        return self._mix(x, y), h

    def step(self, x_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollout path: ``x_t`` ``(B, H)``, ``h`` ``(B, N, 2)`` (already zeroed on reset)."""
        y, h = self.ssm.step(self.norm(x_t), h)  # (B, H), (B, N, 2)
        return self._mix(x_t, y), h


class S5Trunk(nn.Module):
    """Encoder, a stack of :class:`S5Block` and an output norm: observations to features.

    Args:
        observation_dim: input size ``D``.
        hidden_dim: model width ``H``.
        state_dim: S5 state size ``P`` per block.
        num_layers: number of blocks ``L``.
    """

    def __init__(self, observation_dim: int, hidden_dim: int, state_dim: int, num_layers: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(observation_dim, hidden_dim)
        self.blocks = nn.ModuleList(S5Block(hidden_dim, state_dim) for _ in range(num_layers))
        self.out_norm = nn.LayerNorm(hidden_dim)

    def forward(
        self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``observations`` ``(B, T, D)``, ``state`` ``(B, L, N, 2)`` -> features ``(B, T, H)``, state."""
        x = F.gelu(self.encoder(observations))  # (B, T, H)
        new_states = []
        if observations.shape[1] == 1:
            # Rollout step: O(1), resets zero the carried state before the step.
            keep = (~resets).to(x.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1), as T == 1
            state = state * keep  # (B, L, N, 2)
            x_t = x[:, 0]  # (B, H)
            for i, block in enumerate(self.blocks):
                x_t, h = block.step(x_t, state[:, i])
                new_states.append(h)
            x = x_t.unsqueeze(1)  # (B, 1, H)
        else:
            for i, block in enumerate(self.blocks):
                x, h = block(x, state[:, i], resets)
                new_states.append(h)
        return self.out_norm(x), torch.stack(new_states, dim=1)


class SSMActorCritic(ActorCritic):
    """S5 trunks with a Gaussian action head and a value head.

    By default actor and critic have separate trunks (and separate states). With a shared trunk
    the value loss, on the scale of squared returns, dominates the trunk's gradient; on 2-D
    navigation that made meta-training diverge, while separate trunks learn like the MLP.

    Args:
        observation_dim: size of the observation vector (env observation plus anything the data
            side appends, e.g. previous action, reward, done).
        action_dim: size of the action vector.
        hidden_dim: model width ``H`` of encoder and blocks.
        state_dim: S5 state size ``P`` per block (``P / 2`` complex modes are stored).
        num_layers: number of S5 blocks per trunk.
        init_log_std: initial value of the state-independent log standard deviation.
        shared_trunk: one trunk for actor and critic (half the cost, see above for the risk).
        state_dependent_std: add a log-std head on the actor's features (zero at the start, within
            +-2 of ``log_std``): the std then depends on the memory, so an in-context agent can
            explore in a trial's first episodes and act precisely in its last ones. The official
            protocol scores the mean action; with one std for every step the std stays ~1 and the
            policy succeeds through its noise (docs/in_context.md).
    """

    acting_step_class = SSMActingStep

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden_dim: int = 64,
        state_dim: int = 64,
        num_layers: int = 2,
        init_log_std: float = -0.5,
        shared_trunk: bool = False,
        state_dependent_std: bool = False,
    ) -> None:
        super().__init__()
        self.observation_dim = observation_dim
        self.action_dim = action_dim
        self.num_layers = num_layers
        self.num_modes = state_dim // 2
        self.actor_trunk = S5Trunk(observation_dim, hidden_dim, state_dim, num_layers)
        self.critic_trunk = None if shared_trunk else S5Trunk(observation_dim, hidden_dim, state_dim, num_layers)
        add_gaussian_heads(self, hidden_dim, action_dim, init_log_std)
        add_log_std_head(self, hidden_dim, action_dim, state_dependent_std)

    def parameter_groups(self) -> dict[str, list[str]]:
        """``"ssm"``: Lambda, log step and B of every block (S5 practice); ``"default"``: the rest."""
        ssm, default = [], []
        for name, _ in self.named_parameters():
            is_ssm = ".ssm." in name and name.rsplit(".", 1)[-1] in S5.ssm_parameter_names
            (ssm if is_ssm else default).append(name)
        return {"ssm": ssm, "default": default}

    def values(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
        """State values ``[B, T]``; with a separate critic trunk the actor trunk is not run."""
        if self.critic_trunk is None:
            return super().values(observations, state, resets)
        critic_x, _ = self.critic_trunk(observations, state[:, self.num_layers :], resets)
        return self.value_head(critic_x).squeeze(-1)

    def forward_actor(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> PolicyOutput:
        """The actor trunk alone (:meth:`ActorCritic.forward_actor`): ``value`` is zeros and, with
        a separate critic trunk, the critic's part of ``state`` is passed through unchanged."""
        if self.critic_trunk is None:
            return super().forward_actor(observations, state, resets)
        L = self.num_layers
        actor_x, actor_h = self.actor_trunk(observations, state[:, :L], resets)
        mean = bounded_action_mean(self.action_head(actor_x))
        return PolicyOutput(
            mean=mean,
            log_std=self._log_std(actor_x, mean),
            value=mean.new_zeros(mean.shape[:-1]),
            state=torch.cat([actor_h, state[:, L:]], dim=1),
        )

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Zero state ``(batch_size, trunks * num_layers, N, 2)``."""
        dtype = self.action_head.weight.dtype
        trunks = 1 if self.critic_trunk is None else 2
        return torch.zeros(batch_size, trunks * self.num_layers, self.num_modes, 2, device=device, dtype=dtype)

    def forward(
        self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor
    ) -> PolicyOutput:
        """See :meth:`ActorCritic.forward`; ``state`` is ``(B, trunks * num_layers, N, 2)``."""
        L = self.num_layers
        actor_x, actor_h = self.actor_trunk(observations, state[:, :L], resets)  # (B, T, H)
        if self.critic_trunk is None:
            critic_x, new_state = actor_x, actor_h
        else:
            critic_x, critic_h = self.critic_trunk(observations, state[:, L:], resets)
            new_state = torch.cat([actor_h, critic_h], dim=1)
        mean = bounded_action_mean(self.action_head(actor_x))  # (B, T, A)
        return PolicyOutput(
            mean=mean,
            # Expanded, not (A,): under vmap over agents an (A,) output becomes (K, A), which no
            # longer broadcasts against (K, B, T, A).
            log_std=self._log_std(actor_x, mean),  # (B, T, A)
            value=self.value_head(critic_x).squeeze(-1),  # (B, T)
            state=new_state,  # (B, trunks * L, N, 2)
        )
