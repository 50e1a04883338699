"""The actor-critic contract every policy implements.

One interface serves rollouts and training: ``forward`` takes whole sequences ``[B, T, obs_dim]``
with an initial recurrent state and per-step reset flags. Rollouts call it with ``T == 1`` (a
recurrent policy takes its O(1) step path there); training recomputes the same outputs over the
stored sequence. Stateless policies use a state of width 0 so the collector and the MAML code never
branch on the policy kind.

Per-agent (adapted) parameters are applied with ``torch.func.functional_call`` under
``torch.func.vmap`` over the agent dimension, so ``forward`` must be written with plain tensor ops
(no in-place updates of inputs, no data-dependent Python control flow on tensor values).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from metarl_lightning.policies.acting import ActingStep


def bounded_action_mean(raw: torch.Tensor) -> torch.Tensor:
    """Squash the Gaussian mean into the action box ``[-1, 1]`` (actions are sampled around it).

    With an unbounded mean, meta-training on ML1 reach drove ``|mean|`` to ~2.3: nearly every sampled
    action was clipped to the box edge, the environment stopped responding to the policy, and the
    success rate collapsed from 0.4 to 0 (README, "Learning results"). The log-probabilities stay
    those of the Gaussian around the squashed mean, so PPO's ratios are unchanged in form.
    """
    return torch.tanh(raw)


def add_gaussian_heads(policy: nn.Module, feature_dim: int, action_dim: int, init_log_std: float) -> None:
    """Give a recurrent policy ``action_head``, ``value_head`` and a state-independent ``log_std``.

    The action head starts with small weights and zero bias (as cleanrl's PPO), so early exploration
    is set by ``log_std`` rather than by a random initial mean.
    """
    policy.action_head = nn.Linear(feature_dim, action_dim)
    policy.value_head = nn.Linear(feature_dim, 1)
    policy.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))
    with torch.no_grad():
        policy.action_head.weight.mul_(0.01)
        policy.action_head.bias.zero_()


# A state-dependent log-std stays within this distance of the state-independent ``log_std``.
LOG_STD_RANGE = 2.0


def add_log_std_head(policy: nn.Module, feature_dim: int, action_dim: int, enabled: bool) -> None:
    """Give ``policy`` a ``log_std_head`` (``None`` unless ``enabled``), zero-initialised so that the
    std starts at the state-independent ``log_std`` (see :func:`state_dependent_log_std`)."""
    policy.log_std_head = nn.Linear(feature_dim, action_dim) if enabled else None
    if policy.log_std_head is not None:
        nn.init.zeros_(policy.log_std_head.weight)
        nn.init.zeros_(policy.log_std_head.bias)


def state_dependent_log_std(log_std: torch.Tensor, head_out: torch.Tensor | None, mean: torch.Tensor) -> torch.Tensor:
    """``log_std + LOG_STD_RANGE * tanh(head_out)`` (``head_out`` ``None``: ``log_std``), shaped like ``mean``.

    A zero-initialised head starts at the state-independent value; the tanh bounds how far the
    memory can move it (a std between e^-2 and e^2 times the base), so no step can collapse it.
    """
    base = log_std.expand_as(mean)
    return base if head_out is None else base + LOG_STD_RANGE * torch.tanh(head_out)


class PolicyOutput(NamedTuple):
    """What a policy returns for a sequence.

    Attributes:
        mean: Gaussian action mean, ``[B, T, action_dim]``.
        log_std: Gaussian log standard deviation, broadcastable to ``mean``.
        value: state-value estimate, ``[B, T]``.
        state: recurrent state after the last step, ``[B, *state_shape]`` (width 0 if stateless).
    """

    mean: torch.Tensor
    log_std: torch.Tensor
    value: torch.Tensor
    state: torch.Tensor


class ActorCritic(nn.Module, abc.ABC):
    """Base class of Gaussian actor-critic policies (stateless or recurrent).

    Subclasses take ``observation_dim`` and ``action_dim`` as their first two arguments; the CLI
    links them from the data module, so configs only set the architecture.
    """

    observation_dim: int
    action_dim: int
    # A native acting step class (policies/acting.py), built as cls(policy, stacked_params, K, E,
    # with_values); None: the generic vmap step.
    acting_step_class: ClassVar[Callable[..., Any] | None] = None

    def action_head_names(self) -> list[str]:
        """Parameters of the action distribution's output layer (and its log-std).

        What ``model.inner_parameters: head`` adapts (ANIL, Raghu et al. 2020: the body is
        meta-learned, only the head adapts). The default fits the ``add_gaussian_heads`` layout.
        """
        head = ("action_head.", "log_std_head.")
        return [name for name, _ in self.named_parameters() if name.startswith(head) or name == "log_std"]

    def _log_std(self, features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The Gaussian's log-std at ``features`` ``[..., H]``, shaped like ``mean``: ``log_std``, moved
        by ``log_std_head`` where the policy has one (the ``add_gaussian_heads`` / ``add_log_std_head``
        layout)."""
        head = getattr(self, "log_std_head", None)
        return state_dependent_log_std(self.log_std, None if head is None else head(features), mean)

    def parameter_groups(self) -> dict[str, list[str]]:
        """Names of parameters per optimiser group.

        The default puts everything in ``"default"``. Policies with state-space layers return an
        extra ``"ssm"`` group (no weight decay, own learning rate, as the S4/S5 references do).
        """
        return {"default": [name for name, _ in self.named_parameters()]}

    @torch.no_grad()
    def acting_step(
        self,
        stacked_params: dict[str, torch.Tensor] | None,
        num_agents: int,
        envs_per_agent: int,
        with_values: bool = True,
    ) -> ActingStep:
        """The rollout path for one rollout's parameters (see :mod:`metarl_lightning.policies.acting`).

        Without an ``acting_step_class`` it runs ``forward`` with ``T == 1`` (vmap over agents);
        policies that name one get a native step that prepares parameters once and batches agents
        with plain matmuls.

        Args:
            stacked_params: name -> ``[K, *shape]`` per-agent parameters, or ``None`` for this
                module's own parameters (every agent acts with theta).
            num_agents: ``K``.
            envs_per_agent: ``E``.
            with_values: compute the critic; without it a native step skips the critic's layers
                and returns ``value=None`` (the collector then computes values after the rollout).
        """
        if self.acting_step_class is not None:
            return self.acting_step_class(self, stacked_params, num_agents, envs_per_agent, with_values)
        from metarl_lightning.policies.acting import GenericActingStep  # acting imports this module

        return GenericActingStep(self, stacked_params, num_agents, envs_per_agent)

    def values(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> torch.Tensor:
        """State values ``[B, T]`` of a sequence (arguments as :meth:`forward`).

        The default runs ``forward``; policies with a separate critic override it to skip the
        actor (the collector computes a rollout's values this way after acting).
        """
        return self(observations, state, resets).value

    def forward_actor(self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> PolicyOutput:
        """:meth:`forward` for callers that never read the value: ``value`` is zeros.

        The policy loss of the MAML inner step, the TRPO step and every outer loss without a
        critic (a linear baseline and no value loss) need only the action distribution; policies
        with a separate critic override this to skip it (for the S5 policy, a whole second scan).
        ``mean``, ``log_std`` and the actor's part of ``state`` equal :meth:`forward`'s.
        """
        out = self(observations, state, resets)
        return out._replace(value=torch.zeros_like(out.value))

    @abc.abstractmethod
    def initial_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Zero recurrent state, ``[batch_size, *state_shape]``."""

    @abc.abstractmethod
    def forward(
        self, observations: torch.Tensor, state: torch.Tensor, resets: torch.Tensor
    ) -> PolicyOutput:
        """Run the policy over a sequence.

        Args:
            observations: ``[B, T, observation_dim]``.
            state: recurrent state before step 0, ``[B, *state_shape]``.
            resets: ``[B, T]`` bool; ``resets[b, t]`` zeroes the state *before* step ``t`` (the
                observation at ``t`` is the first of a new episode or trial).

        Returns:
            A :class:`PolicyOutput` with per-step mean, log-std and value, and the final state.
        """
