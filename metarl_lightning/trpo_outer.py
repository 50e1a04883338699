"""The MAML-TRPO outer step on a meta-batch: the closures :func:`~metarl_lightning.algorithms.trpo.trpo_step` needs.

Loss: the unclipped surrogate ``-E[pi_theta'(a|s) / pi_old(a|s) A]`` of every agent's query
rollout under its adapted parameters ``theta'_k(theta)`` (minus the entropy bonus), as MAML-TRPO
(Finn et al. 2017; garage; the Meta-World+ reference). Constraint: the mean KL from the acting
(adapted) policy to the adapted policy at the new ``theta``. The loss gradient goes through the
inner step (second order unless ``first_order``); the Fisher-vector products treat the inner
gradient as a constant (theta' = theta + const, so the Fisher is the adapted policy's own): through
the S5 scan the exact products are third-order and made an ML1 iteration ~3x slower (382 env
steps/s on the shared box), and the line search checks the exact KL anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.algorithms.trpo import TRPOStep, gaussian_kl, trpo_step
from metarl_lightning.objectives import PPOSettings, ppo_loss_of_output
from metarl_lightning.policies.base import ActorCritic, PolicyOutput
from metarl_lightning.policies.functional import batched_policy_forward
from metarl_lightning.rollout_data import Rollout

Adapt = Callable[[dict[str, torch.Tensor], Rollout, bool], dict[str, torch.Tensor]]


def maml_trpo_update(
    policy: ActorCritic,
    meta_parameters: dict[str, torch.Tensor],
    extra_parameters: Sequence[torch.Tensor],
    adapt: Adapt,
    support: Rollout,
    query: Rollout,
    max_kl: float,
    first_order: bool,
    entropy_coef: float = 0.0,
    cg_iterations: int = 10,
    damping: float = 1e-5,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> TRPOStep:
    """One KL-constrained step of ``meta_parameters`` (and ``extra_parameters``, e.g. Meta-SGD step sizes).

    Args:
        policy: the architecture (its parameters are ``meta_parameters``, updated in place).
        meta_parameters: name -> leaf parameter of the policy.
        extra_parameters: other leaves ``adapt`` depends on.
        adapt: ``(stacked theta [K, ...], support, first_order) -> theta'_k`` (the module's inner step).
        support, query: ``[K, E, T]`` rollouts with advantages (query collected with ``theta'_k``).
        max_kl: trust region of the mean KL per sample.
        first_order: drop the inner step's second-order terms in the gradient and the Fisher.
        entropy_coef: weight of the entropy bonus in the loss.
        cg_iterations, damping: of the natural-gradient solve.
        reduce: mean over data-parallel ranks (identity on one process).
    """
    num_agents = query.rewards.shape[0]
    surrogate = PPOSettings(clip_epsilon=math.inf, value_coef=0.0, entropy_coef=entropy_coef)

    def adapted(order_one: bool) -> dict[str, torch.Tensor]:
        return adapt(stack_for_agents(meta_parameters, num_agents), support, order_one)

    def forward(params: dict[str, torch.Tensor]) -> PolicyOutput:
        # The actor alone: the surrogate and the KL never read the value (the critic has its own steps).
        return batched_policy_forward(policy, params, query.observations, query.initial_state, query.resets, actor_only=True)

    def loss_of(out: PolicyOutput) -> torch.Tensor:
        loss = ppo_loss_of_output(out, query, surrogate, with_value=False)
        return loss.policy - entropy_coef * loss.entropy

    with torch.enable_grad():
        acting = {k: v.detach() for k, v in adapted(True).items()}
    with torch.no_grad():
        old = forward(acting)
    old_mean, old_log_std = old.mean.detach(), old.log_std.detach()

    def kl_of(out: PolicyOutput) -> torch.Tensor:
        return gaussian_kl(old_mean, old_log_std, out.mean, out.log_std).mean()

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        # Values only: a first-order inner step gives the same theta' without a graph to keep,
        # and one forward gives both the loss and the KL of a line-search point.
        with torch.enable_grad():
            params = {k: v.detach() for k, v in adapted(True).items()}
        with torch.no_grad():
            out = forward(params)
            return loss_of(out), kl_of(out)

    leaves = [*meta_parameters.values(), *extra_parameters]
    return trpo_step(
        leaves,
        lambda: loss_of(forward(adapted(first_order))),
        lambda: kl_of(forward(adapted(True))),
        max_kl=max_kl,
        cg_iterations=cg_iterations,
        damping=damping,
        reduce=reduce,
        evaluate=evaluate,
    )
