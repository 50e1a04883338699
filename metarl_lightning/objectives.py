"""The PPO objective of a batch of task-agents, evaluated with per-agent parameters.

Both the MAML inner loss (on support rollouts) and the outer loss (on query rollouts) are this one
function; only the parameters and the data differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarl_lightning.algorithms.ppo import (
    PPOLoss,
    clipped_surrogate_loss,
    gaussian_entropy,
    gaussian_log_prob,
    normalize_advantages,
    ppo_loss,
)
from metarl_lightning.policies.base import ActorCritic, PolicyOutput
from metarl_lightning.policies.functional import batched_policy_forward
from metarl_lightning.rollout_data import Rollout


@dataclass(frozen=True)
class PPOSettings:
    """Coefficients of the PPO objective.

    Attributes:
        clip_epsilon: ratio clip range.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        value_clip_epsilon: clip range of the value loss; ``None`` for the plain squared error.
    """

    clip_epsilon: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    value_clip_epsilon: float | None = None


def agents_ppo_loss(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor],
    rollout: Rollout,
    settings: PPOSettings,
    with_value: bool = True,
) -> PPOLoss:
    """PPO loss of ``K`` agents on their own rollouts, averaged over agents.

    Every agent has the same number of samples, so the global mean equals the mean of the per-agent
    means, and ``K * loss.total`` has agent ``k``'s own loss gradient in slice ``k`` of the stacked
    parameters (what the MAML inner step needs). Advantages are normalised per agent.

    Args:
        policy: the architecture.
        stacked_params: name -> ``[K, *shape]``.
        rollout: ``[K, E, T, ...]`` experience with advantages computed.
        settings: PPO coefficients.
        with_value: run the critic and include the value loss; ``False`` runs the actor alone
            (:meth:`ActorCritic.forward_actor`) and the value term is exactly zero, for callers
            that never use it (the inner step's policy loss, an outer loss without a critic).
    """
    out = batched_policy_forward(
        policy, stacked_params, rollout.observations, rollout.initial_state, rollout.resets, actor_only=not with_value
    )
    return ppo_loss_of_output(out, rollout, settings, with_value)


def ppo_loss_of_output(out: PolicyOutput, rollout: Rollout, settings: PPOSettings, with_value: bool = True) -> PPOLoss:
    """:func:`agents_ppo_loss` from the policy's output on ``rollout`` (``[K, E, T, ...]`` fields),
    for callers that need that forward for something else too (the TRPO line search's KL).
    ``with_value=False``: ``out.value`` is not read and the value term is zero."""
    log_probs = gaussian_log_prob(out.mean, out.log_std, rollout.actions)  # (K, E, T)
    entropy = gaussian_entropy(out.log_std, out.mean)  # (K, E, T)
    return ppo_loss(
        log_probs=log_probs,
        old_log_probs=rollout.log_probs,
        advantages=rollout.normalized_advantages(),
        # Without a critic the value "prediction" is the target itself: a zero term, no gradient.
        values=out.value if with_value else rollout.returns,
        returns=rollout.returns,
        entropy=entropy,
        clip_epsilon=settings.clip_epsilon,
        value_coef=settings.value_coef if with_value else 0.0,
        entropy_coef=settings.entropy_coef,
        old_values=rollout.values if with_value else None,
        value_clip_epsilon=settings.value_clip_epsilon if with_value else None,
        normalize=False,
    )


def exploration_loss(
    policy: ActorCritic,
    stacked_params: dict[str, torch.Tensor],
    support: Rollout,
    agent_advantages: torch.Tensor,
    clip_epsilon: float,
) -> torch.Tensor:
    """The support rollouts' share of the meta-gradient that plain MAML drops (E-MAML, Stadie et al. 2018).

    The query data depend on theta twice: through theta_k' = U(theta, support_k) (what the outer loss
    differentiates) and through the *sampling* of support_k itself, which MAML treats as constants.
    The second part is ``E[R'_k * grad sum_t log pi_theta(a_t | s_t)]`` over the support steps, with
    ``R'_k`` the post-adaptation return of agent ``k``: support behaviour that led to a good adapted
    policy is made more likely, whatever it earned itself. The caller passes ``A_k``, ``R'_k``
    normalised over the agents (:func:`post_adaptation_advantages`: the other agents' returns are
    its baseline); the term is PPO's clipped surrogate with that one advantage on every support step
    of agent ``k``, so several outer epochs on the same data stay near the acting policy. At
    ``pi_theta == pi_old`` its gradient is the REINFORCE estimate ``-mean_k,t(A_k grad log pi_theta)``.

    Args:
        policy: the architecture.
        stacked_params: theta stacked ``[K, *shape]`` (the *pre*-adaptation parameters that acted).
        support: ``[K, E, T, ...]`` support rollouts; ``log_probs`` are the acting ones.
        agent_advantages: ``[K]`` one advantage per agent.
        clip_epsilon: ratio clip range.

    Returns:
        The scalar loss, a mean over agents and steps (to be scaled by ``model.exploration_coef``).
    """
    out = batched_policy_forward(
        policy, stacked_params, support.observations, support.initial_state, support.resets, actor_only=True
    )
    log_probs = gaussian_log_prob(out.mean, out.log_std, support.actions)  # (K, E, T)
    advantages = agent_advantages.to(log_probs.dtype).view(-1, 1, 1).expand_as(log_probs)
    return clipped_surrogate_loss(log_probs, support.log_probs, advantages, clip_epsilon)


def post_adaptation_advantages(post_adaptation_returns: torch.Tensor) -> torch.Tensor:
    """``[K]`` mean query returns -> zero-mean, unit-variance advantages over the agents.

    All zeros for ``K == 1``: with no other agent to compare with there is no signal.
    """
    return normalize_advantages(post_adaptation_returns.detach())
