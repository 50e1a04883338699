"""MetaRLModule: MAML + PPO meta-training of an actor-critic policy, with manual optimisation.

One ``training_step`` is one meta-iteration (see DESIGN.md, "One meta-iteration"):

1. support rollouts of every task-agent with the meta-parameters theta (no grad);
2. inner update per agent, theta_k' = theta - alpha * grad L_ppo(theta; support_k);
3. query rollouts of every agent with its own theta_k' (no grad);
4. ``ppo_epochs`` outer updates: recompute theta_k' from theta (with graph, first- or second-order),
   PPO loss of the query data under theta_k', backward, all-reduce across ranks, clip, step.

The environments and the collector belong to the data module; the module reaches them through
``self.trainer.datamodule`` because the query rollouts need the adapted parameters, which only
exist inside the step.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from metarl_lightning.algorithms.lr_schedule import linear_lr_factor
from metarl_lightning.algorithms.maml import agent_chunks, inner_update, stack_for_agents
from metarl_lightning.algorithms.ppo import PPOLoss, weighted_mean_loss
from metarl_lightning.algorithms.std_schedule import project_log_std, std_ceiling
from metarl_lightning.checks.config import check_lr_schedule
from metarl_lightning.checks.hyperparameters import check_hyperparameters
from metarl_lightning.distributed import all_reduce_gradients, mean_over_ranks, sum_over_ranks
from metarl_lightning.errors import require
from metarl_lightning.meta_batch import MetaBatch
from metarl_lightning.objectives import PPOSettings, agents_ppo_loss, exploration_loss, post_adaptation_advantages
from metarl_lightning.observation_normalizer import ObservationNormalizer
from metarl_lightning.policies.base import ActorCritic
from metarl_lightning.rollout_data import BaselineKind, Rollout
from metarl_lightning.rollouts import RolloutCollector
from metarl_lightning.trpo_outer import maml_trpo_update


def _key(parameter_name: str) -> str:
    """A policy parameter's name as a ``ParameterDict`` key (no dots allowed there)."""
    return parameter_name.replace(".", "__")


class MetaRLModule(L.LightningModule):
    """MAML + PPO meta-learner.

    Args:
        policy: the actor-critic (chosen in YAML by ``class_path``; observation and action sizes are
            linked from the data module).
        meta_lr: Adam learning rate of the outer (meta) update.
        inner_lr: step size alpha of the inner (adaptation) update.
        inner_steps: inner gradient steps per task; 0 turns MAML off: plain PPO on one rollout per
            iteration (multi-task PPO on MT; RL^2 with ``data.context_inputs`` and
            ``data.reset_state_on: trial``, where the policy adapts in context alone). Its
            pre- and post-adaptation metrics are then the same rollout's.
        first_order: drop second-order terms of the meta-gradient (FOMAML).
        gamma: discount factor.
        gae_lambda: GAE lambda.
        clip_epsilon: PPO ratio clip range (inner and outer loss).
        ppo_epochs: outer PPO updates per meta-iteration on the same query data.
        value_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        value_clip_epsilon: clip range of the value loss (``null``: unclipped).
        max_grad_norm: global norm the meta-gradient is clipped to (``null``: no clipping).
        ssm_lr: learning rate of the SSM parameters (``null``: ``meta_lr``), as the S4/S5 recipes do.
        weight_decay: AdamW weight decay of the non-SSM parameters (SSM parameters get none).
        reward_scale: rewards are multiplied by this before GAE, so value targets are in scaled
            units (logged returns stay in the env's). Meta-World rewards reach 10 per step; 0.1
            keeps ML1 value losses O(1-30) instead of O(1e3). Learning on ML1 was the same at 1.0
            and 0.1 once the action mean was bounded (README, "Learning results").
        target_kl: stop the outer PPO epochs of an iteration once the approximate KL between the
            acting (adapted) policy and the current one exceeds ``1.5 * target_kl`` (``null``: always
            run ``ppo_epochs``), as in Stable-Baselines3's PPO.
        inner_parameters: what the inner step adapts: ``all`` (every parameter, but the SSM group
            unless ``adapt_ssm_parameters``) or ``head`` (the action head and log-std only, ANIL,
            Raghu et al. 2020; the body is meta-learned in the outer loop alone).
        learn_inner_lr: Meta-SGD (Li et al. 2017): meta-learn one inner step size per adapted
            parameter element, starting at ``inner_lr`` (kept positive as ``exp`` of a log step, with
            the optimiser's ``meta_lr`` and no weight decay).
        agent_chunk_size: compute the meta-gradient over this many agents at a time (``null``: all at
            once). The meta-loss is a mean over agents, so the summed chunk gradients equal the
            one-piece gradient (to float rounding) while the backward holds one chunk's graph: peak
            learner memory falls with the chunk (docs/benchmarks.md), time per update hardly changes.
        outer_minibatch_size: agents per outer optimiser step (``null``: all, one step per PPO
            epoch). Smaller gives ``ceil(K / size)`` Adam steps per epoch, as PPO's minibatches do:
            with one full-batch step per epoch a parameter moves at most ``ppo_epochs x meta_lr``
            per iteration (the log-std barely moved on ML1). The KL stop is checked before every step.
        outer_optimizer: ``ppo`` (the clipped objective, ``ppo_epochs`` Adam steps with the KL stop)
            or ``trpo`` (MAML-TRPO, as garage and the Meta-World+ reference: one natural-gradient
            step of the unclipped surrogate within a mean KL of ``max_kl`` from the acting
            policy, through the inner step; the critic then takes ``ppo_epochs`` Adam steps on the
            value loss alone). TRPO moves each direction by its curvature, where Adam moves every
            parameter by about ``meta_lr`` (the log-std barely moved under PPO, docs/results.md).
            It computes over all agents at once and takes no minibatches.
        max_kl: the trust region of the TRPO step (mean KL per sample).
        std_ceiling: anneal exploration: before every meta-iteration the policy's ``log_std`` is
            projected below a ceiling that falls geometrically from std 1 to this value over the
            first ``std_ceiling_epochs`` iterations and stays there
            (:mod:`metarl_lightning.algorithms.std_schedule`; the outer update alone barely moves
            the std, and Meta-World's protocol scores the mean action). ``null``: off. Refused
            with a state-dependent std (a std head), which the parameter's bound cannot hold.
        std_ceiling_epochs: meta-iterations over which the ceiling falls to ``std_ceiling``.
        std_ceiling_on: what the ceiling bounds: ``policy`` projects theta's ``log_std`` (support,
            query and evaluation all act with the lower std); ``adapted`` bounds only theta_k''s
            (a differentiable clamp after the inner step): the support rollouts explore with
            theta's std, the query rollouts and the outer loss are those of a near-deterministic
            adapted policy, as the protocol scores it (explore, then exploit).
        meta_lr_final: anneal the outer optimiser's learning rate linearly, every group alike,
            from its start value (``meta_lr``, ``ssm_lr``) at the first iteration to
            ``meta_lr_final / meta_lr`` times it at ``trainer.max_epochs``
            (:mod:`metarl_lightning.algorithms.lr_schedule`; 0.0 is PPO's usual anneal to zero).
            ``null``: constant. A resumed run keeps the schedule only with the same ``max_epochs``.
        outer_env_minibatches: split every agent's ``E`` query envs into this many groups and take
            one optimiser step per group (times the agent minibatches) per PPO epoch: PPO's
            minibatches over trajectories, every step seeing every task (multi-task PPO needs this:
            one step per epoch on 100 trajectories learns slowly). The inner step still adapts on
            the whole support rollout. Must divide ``data.envs_per_task``. 1: off.
        baseline: what GAE subtracts, in the inner and the outer loss alike: ``critic`` (the policy's
            meta-learned value head) or ``linear`` (a linear feature baseline fitted by least squares
            on each task's own rollouts, the reference MAML recipe: a meta-learned critic cannot know
            a hidden goal before adaptation, a baseline fitted on the task's data can). The critic is
            trained in either case.
        success_bonus: added to the reward of every step where Meta-World's ``info['success']`` holds,
            in the *outer* objective only (the query rollouts' advantages; with ``inner_steps: 0``
            the one rollout's). The inner step, the context inputs, the logged returns and the
            evaluation all see the env's own reward. Why: reach's v2 reward is long-tailed and
            nearly flat within a few cm of the success radius, so the return hardly tells a near
            miss from a success, while the protocol counts only successes (docs/results.md).
            0: off (the default; every published number of this project was made without it).
        exploration_coef: weight of the support rollouts' term of the meta-gradient
            (:func:`~metarl_lightning.objectives.exploration_loss`, E-MAML): support behaviour is
            reinforced by the return its agent reached *after* adaptation, normalised over the
            agents of the outer step. Plain MAML (0, the default) treats the support samples as
            constants and so never rewards exploring for the sake of the inner step. PPO outer step
            with ``inner_steps > 0`` only.
        adapt_ssm_parameters: also adapt the SSM group (Lambda, log-step, B) in the inner loop. Off
            by default: they are meta-learned in the outer loop only (one inner step on the state
            matrix's eigenvalues changes the dynamics of every time step at once); the SSM runs
            reported in the README were made this way.
        normalize_observations: standardise the env observation the policy sees by running mean
            and variance over the training rollouts, clipped to +-10
            (:mod:`metarl_lightning.observation_normalizer`: folded in once per meta-iteration,
            saved in the checkpoint, applied in the official evaluation alike; the task one-hot and
            the context inputs pass unchanged). Off by default (docs/results.md has its ablation).
    """

    def __init__(
        self,
        policy: ActorCritic,
        meta_lr: float = 3e-4,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        first_order: bool = False,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        clip_epsilon: float = 0.2,
        ppo_epochs: int = 4,
        value_coef: float = 0.5,
        entropy_coef: float = 0.0,
        value_clip_epsilon: float | None = None,
        max_grad_norm: float | None = 1.0,
        ssm_lr: float | None = None,
        weight_decay: float = 0.0,
        reward_scale: float = 1.0,
        target_kl: float | None = None,
        adapt_ssm_parameters: bool = False,
        baseline: BaselineKind = "critic",
        inner_parameters: Literal["all", "head"] = "all",
        learn_inner_lr: bool = False,
        agent_chunk_size: int | None = None,
        outer_minibatch_size: int | None = None,
        outer_env_minibatches: int = 1,
        outer_optimizer: Literal["ppo", "trpo"] = "ppo",
        max_kl: float = 0.01,
        std_ceiling: float | None = None,
        std_ceiling_epochs: int = 10,
        std_ceiling_on: Literal["policy", "adapted"] = "policy",
        meta_lr_final: float | None = None,
        success_bonus: float = 0.0,
        exploration_coef: float = 0.0,
        normalize_observations: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["policy"])
        check_hyperparameters(**self.hparams)
        self.automatic_optimization = False
        self.policy = policy
        # The ceiling projects the state-independent log_std parameter; a std head adds up to
        # LOG_STD_RANGE on top of it per step, which no projection of a parameter can bound.
        require(
            std_ceiling is None or getattr(policy, "log_std_head", None) is None,
            "model.std_ceiling",
            "bounds the state-independent std only: leave it null with model.policy.init_args.state_dependent_std: true",
        )
        self.reward_scale = reward_scale
        self.ppo = PPOSettings(clip_epsilon, value_coef, entropy_coef, value_clip_epsilon)
        self.inner_log_lrs = nn.ParameterDict()
        if learn_inner_lr:
            named = dict(self.policy.named_parameters())
            for name in sorted(self._adapted_names()):
                self.inner_log_lrs[_key(name)] = nn.Parameter(torch.full_like(named[name].detach(), math.log(inner_lr)))
        # Statistics in the module's buffers: checkpointed with the policy they belong to.
        self.obs_normalizer = ObservationNormalizer(policy.observation_dim) if normalize_observations else None
        # Counted here (not derived) so it survives resume and changes of the rollout size.
        self.register_buffer("env_steps", torch.zeros((), dtype=torch.long), persistent=True)

    # ----------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with the SSM parameters in their own group (own lr, no weight decay)."""
        named = dict(self.policy.named_parameters())
        groups = []
        for group_name, names in self.policy.parameter_groups().items():
            if not names:
                continue
            is_ssm = group_name == "ssm"
            groups.append(
                {
                    "name": group_name,
                    "params": [named[n] for n in names],
                    "lr": self._base_lr(group_name),
                    "weight_decay": 0.0 if is_ssm else self.hparams.weight_decay,
                }
            )
        if len(self.inner_log_lrs):
            groups.append({"name": "inner_lr", "params": list(self.inner_log_lrs.values()), "lr": self._base_lr("inner_lr"), "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=self.hparams.meta_lr)

    def _base_lr(self, group_name: str) -> float:
        """A parameter group's learning rate before any schedule: ``ssm_lr`` for the SSM group (when
        set), ``meta_lr`` for every other."""
        if group_name == "ssm" and self.hparams.ssm_lr:
            return self.hparams.ssm_lr
        return self.hparams.meta_lr

    def _schedule_lr(self, optimizer: Any) -> float | None:
        """Set this iteration's learning rates (``model.meta_lr_final``); the multiplier, or ``None``
        when the rate is constant. Set from the epoch, not stepped: a resumed run needs no
        scheduler state."""
        final = self.hparams.get("meta_lr_final")
        if final is None:
            return None
        factor = linear_lr_factor(self.current_epoch, self.trainer.max_epochs, final / self.hparams.meta_lr)
        for group in optimizer.param_groups:
            group["lr"] = self._base_lr(group.get("name", "")) * factor
        return factor

    def setup(self, stage: str) -> None:
        """Tell the observation normaliser how many leading input coordinates are the env's
        observation (a checkpoint restored afterwards brings its own, checked to match)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.obs_normalizer is not None and datamodule is not None:
            self.obs_normalizer.set_columns(datamodule.env_observation_dim)

    def on_fit_start(self) -> None:
        """The schedule's epoch count, once: the CLI checks it before anything is built, this covers
        a Trainer built in code."""
        check_lr_schedule(self.hparams, {"max_epochs": self.trainer.max_epochs})

    def inner_step_sizes(self) -> float | dict[str, torch.Tensor]:
        """The inner step: ``inner_lr``, or the learned per-element step sizes (Meta-SGD)."""
        if not len(self.inner_log_lrs):
            return self.hparams.inner_lr
        return {name: self.inner_log_lrs[_key(name)].exp() for name in self._adapted_names()}

    # ----------------------------------------------------------------------------------- the step
    def _meta_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.policy.named_parameters())

    @property
    def uses_critic(self) -> bool:
        """Whether anything reads the critic: the advantages (``baseline: critic``) or a value loss
        (``value_coef > 0``). Otherwise it is never run: not while acting, not after a rollout,
        not in the losses (a linear baseline with ``value_coef: 0``, as the Meta-World+ reference
        MAML-TRPO, which has no critic at all)."""
        return self.hparams.get("baseline", "critic") == "critic" or self.ppo.value_coef > 0

    def _adapted_names(self) -> set[str]:
        groups = self.policy.parameter_groups()
        names = {n for group in groups.values() for n in group}
        if not self.hparams.adapt_ssm_parameters:
            names -= set(groups.get("ssm", []))
        if self.hparams.get("inner_parameters", "all") == "head":
            names &= set(self.policy.action_head_names())
        return names

    def _adapt(self, params: dict[str, torch.Tensor], support: Rollout, first_order: bool) -> dict[str, torch.Tensor]:
        """theta_k' for every agent; ``params`` are stacked ``[K, ...]``."""
        num_agents = support.rewards.shape[0]
        adapted_names = self._adapted_names()
        fixed = {k: v for k, v in params.items() if k not in adapted_names}

        def inner_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            # The policy-gradient surrogate only: the value loss is on the scale of squared returns
            # and, through a trunk shared with the actor, one inner step on it wrecks the actor
            # (it made SSM adaptation collapse on nav2d). The critic is meta-learned in the outer loss.
            loss = agents_ppo_loss(self.policy, {**fixed, **p}, support, self.ppo, with_value=False)
            # Sum of per-agent losses: slice k of the gradient is agent k's own gradient.
            return num_agents * (loss.policy - self.ppo.entropy_coef * loss.entropy)

        adaptable = {k: v for k, v in params.items() if k in adapted_names}
        adapted = inner_update(adaptable, inner_loss, self.inner_step_sizes(), self.hparams.inner_steps, first_order)
        ceiling = self._std_ceiling()
        if ceiling is not None and self.hparams.get("std_ceiling_on", "policy") == "adapted" and "log_std" in adapted:
            adapted["log_std"] = adapted["log_std"].clamp(max=math.log(ceiling))
        return {**fixed, **adapted}

    def _collect(
        self,
        collector: RolloutCollector,
        params: dict[str, torch.Tensor] | None,
        noise: torch.Tensor,
        num_steps: int,
        after: Rollout | None = None,
        outer: bool = False,
    ) -> Rollout:
        """Roll out with per-agent ``params`` (``None``: all agents act with theta) and add GAE.

        ``after``: a rollout (acted with theta) whose trials this one continues (``query_state:
        carry``): its final state and context inputs are where every env starts. ``outer``: the
        rollout feeds the outer objective (its advantages take ``success_bonus``).
        """
        detached = None if params is None else {k: v.detach() for k, v in params.items()}
        start_state = None if after is None else self._final_state(after)
        start_context = None if after is None else after.final_context
        rollout = collector.collect(
            self.policy,
            detached,
            num_steps,
            noise,
            start_state=start_state,
            start_context=start_context,
            with_values=self.uses_critic,
            obs_normalizer=self.obs_normalizer,
            # Training rollouts feed the statistics; validation and test read them only.
            record_observations=self.training,
        )
        self.compute_advantages(rollout, outer=outer)
        return rollout

    @torch.no_grad()
    def _final_state(self, rollout: Rollout) -> torch.Tensor:
        """``[K, E, *S]``: the recurrent state after a theta rollout's last step, by the scan over it."""
        K, E = rollout.rewards.shape[:2]
        out = self.policy(rollout.observations.flatten(0, 1), rollout.initial_state.flatten(0, 1), rollout.resets.flatten(0, 1))
        return out.state.reshape(K, E, *out.state.shape[1:])

    def compute_advantages(self, rollout: Rollout, outer: bool = False) -> None:
        """GAE with the module's gamma, lambda, reward scale and baseline (training and evaluation);
        ``outer``: for the outer objective, with ``success_bonus`` added to the rewards."""
        hp = self.hparams
        bonus = hp.get("success_bonus", 0.0) if outer else 0.0
        rollout.compute_advantages(hp.gamma, hp.gae_lambda, self.reward_scale, hp.get("baseline", "critic"), success_bonus=bonus)

    def adapt_and_collect(
        self, batch: MetaBatch, collector: RolloutCollector, num_steps: int, query_state: str = "fresh"
    ) -> tuple[Rollout, Rollout]:
        """Support rollouts with theta, per-agent adaptation, query rollouts with theta_k'.

        Used by training and by evaluation (where the query rollouts measure adapted performance).
        With ``inner_steps: 0`` nothing adapts, so a second rollout with the same theta would only
        cost env steps: the query rollout is also returned as the support. ``query_state``:
        ``carry`` starts the query trials where the support trials ended (``data.query_state``).
        """
        collector.env.set_tasks(batch.tasks)
        if self.hparams.inner_steps == 0:
            query = self._collect(collector, None, batch.query_noise, num_steps, outer=True)
            return query, query
        support = self._collect(collector, None, batch.support_noise, num_steps)
        pieces = []
        for index in agent_chunks(batch.num_agents, self.hparams.get("agent_chunk_size")):
            chunk = support.agents(index)
            theta = stack_for_agents(self._meta_parameters(), chunk.rewards.shape[0])
            with torch.enable_grad():
                # First order suffices to *act* with theta_k'; the graph is rebuilt in the update.
                leaf = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
                pieces.append({k: v.detach() for k, v in self._adapt(leaf, chunk, first_order=True).items()})
        adapted = pieces[0] if len(pieces) == 1 else {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        query = self._collect(
            collector, adapted, batch.query_noise, num_steps, after=support if query_state == "carry" else None, outer=True
        )
        return support, query

    def training_step(self, batch: MetaBatch, batch_idx: int) -> None:
        """One meta-iteration (module docstring)."""
        datamodule = self.trainer.datamodule
        started = time.perf_counter()
        ceiling = self._project_std()
        support, query = self.adapt_and_collect(
            batch, datamodule.train_collector, datamodule.rollout_steps, getattr(datamodule, "query_state", "fresh")
        )
        collect_seconds = time.perf_counter() - started

        optimizer = self.optimizers()
        lr_factor = self._schedule_lr(optimizer)
        losses: list[PPOLoss] = []
        grad_norms: list[torch.Tensor] = []
        trpo: dict[str, torch.Tensor] = {}
        minibatches = self._outer_minibatches(batch.num_agents, query.rewards.shape[1])
        if self.hparams.get("outer_optimizer", "ppo") == "trpo":
            # One step of the actor, then the critic's value steps (one minibatch: trpo takes none).
            # The TRPO step runs as the optimiser's closure: it writes theta itself (no .grad is
            # set, so Adam applies nothing), but Lightning counts the call, so global_step,
            # --trainer.max_steps and the per-epoch last.ckpt advance as with the PPO step. Without
            # it a TRPO run with no critic never moved global_step and no epoch was checkpointed.
            optimizer.zero_grad(set_to_none=True)
            optimizer.step(closure=lambda: trpo.update(self._trpo_update(support, query)))
            for _ in range(self.hparams.ppo_epochs if self.uses_critic else 0):
                losses.append(self._value_step(query, optimizer))
                grad_norms.append(self._clip_gradients())
                optimizer.step()
            if not losses:  # no critic to train: the metrics' entropy of the query under theta
                with torch.no_grad():
                    theta = stack_for_agents(self._meta_parameters(), query.rewards.shape[0])
                    losses.append(agents_ppo_loss(self.policy, theta, query, self.ppo, with_value=False))
        else:
            stopped = False
            for _ in range(self.hparams.ppo_epochs):
                for agents, envs in minibatches:
                    step = self._outer_step(support.agents(agents), query.agents(agents).envs(envs), optimizer, may_stop=bool(losses))
                    if step is None:
                        stopped = True
                        break
                    losses.append(step[0])
                    grad_norms.append(step[1])
                if stopped:
                    break
        # The first epoch's loss over all agents (its minibatches weighted by their share).
        sizes = [(a.stop - a.start) * (e.stop - e.start) for a, e in minibatches]
        head = list(zip(sizes, losses[: len(minibatches)]))
        first = weighted_mean_loss([(size / sum(n for n, _ in head), loss) for size, loss in head])
        last = losses[-1]

        world = self.trainer.world_size
        if self.obs_normalizer is not None:
            # After the update: the iteration's rollouts, inner steps and outer loss saw one transform.
            self.obs_normalizer.commit(sum_over_ranks if world > 1 else None)
        steps_this_iteration = (query.num_steps + (0 if support is query else support.num_steps)) * world
        self.env_steps += steps_this_iteration
        elapsed = time.perf_counter() - started
        metrics = {} if ceiling is None else {"train/std_ceiling": torch.tensor(ceiling)}
        if lr_factor is not None:
            metrics["train/meta_lr"] = torch.tensor(self.hparams.meta_lr * lr_factor)
        metrics |= {
            "train/pre_adaptation_return": support.episode_return.mean(),
            "train/post_adaptation_return": query.episode_return.mean(),
            "train/pre_adaptation_success": support.episode_success.mean(),
            "train/post_adaptation_success": query.episode_success.mean(),
            "train/meta_loss": first.total.detach(),
            "train/policy_loss": first.policy.detach(),
            "train/value_loss": first.value.detach(),
            "train/entropy": first.entropy.detach(),
            "train/approx_kl": last.approx_kl,
            "train/ppo_epochs_run": torch.tensor(len(losses) / len(minibatches)),
            "train/clip_fraction": last.clip_fraction,
        }
        if grad_norms:  # none after a TRPO step without a critic to train
            metrics["train/grad_norm"] = torch.stack(grad_norms).mean()
        if trpo:  # the surrogate and KL of the TRPO step replace the PPO terms
            metrics.update(trpo)
            metrics["train/approx_kl"] = trpo["train/trpo_kl"]
            metrics["train/policy_loss"] = trpo["train/trpo_loss_before"]
        metrics.update(self._trial_metrics("train", query))
        # Epoch aggregates only: one series per metric in MLflow (not `_step` and `_epoch` twins).
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=world > 1)
        self.log("train/env_steps", self.env_steps.to(torch.float32), on_step=False, on_epoch=True, reduce_fx="max", rank_zero_only=True)
        self.log("train/env_steps_per_s", steps_this_iteration / elapsed, on_step=False, on_epoch=True, rank_zero_only=True)
        self.log("train/collect_fraction", collect_seconds / elapsed, on_step=False, on_epoch=True, rank_zero_only=True)
        # The learner's torch threads this iteration (data.learner_threads; they set the float rounding).
        self.log("train/learner_threads", float(torch.get_num_threads()), on_step=False, on_epoch=True, rank_zero_only=True)
        # Shown in the progress bar (the callbacks' bar reads these); not logged: train/* has them.
        self.log("post_success", query.episode_success.mean(), prog_bar=True, logger=False, on_step=True, on_epoch=False, sync_dist=world > 1)
        self.log("post_return", query.episode_return.mean(), prog_bar=True, logger=False, on_step=True, on_epoch=False, sync_dist=world > 1)
        self.log("steps_per_s", steps_this_iteration / elapsed, prog_bar=True, logger=False, on_step=True, on_epoch=False, rank_zero_only=True)

    def _std_ceiling(self) -> float | None:
        """This iteration's std ceiling (``model.std_ceiling``; ``None``: off)."""
        final = self.hparams.get("std_ceiling")
        if final is None:
            return None
        return std_ceiling(self.current_epoch, final, self.hparams.get("std_ceiling_epochs", 10))

    def _project_std(self) -> float | None:
        """Project the policy's ``log_std`` below this iteration's ceiling when it bounds theta
        (``std_ceiling_on: policy``; ``adapted`` is clamped in :meth:`_adapt`); the ceiling."""
        ceiling = self._std_ceiling()
        log_std = getattr(self.policy, "log_std", None)
        if ceiling is not None and log_std is not None and self.hparams.get("std_ceiling_on", "policy") == "policy":
            project_log_std(log_std, ceiling)
        return ceiling

    def _trpo_update(self, support: Rollout, query: Rollout) -> dict[str, torch.Tensor]:
        """The MAML-TRPO step of the actor (:mod:`metarl_lightning.trpo_outer`); its metrics."""
        step = maml_trpo_update(
            self.policy,
            self._meta_parameters(),
            list(self.inner_log_lrs.values()),
            self._adapt,
            support,
            query,
            max_kl=self.hparams.max_kl,
            first_order=self.hparams.first_order,
            entropy_coef=self.ppo.entropy_coef,
            reduce=self._mean_over_ranks,
        )
        return {
            "train/trpo_loss_before": step.loss_before,
            "train/trpo_loss_after": step.loss_after,
            "train/trpo_kl": step.kl,
            "train/trpo_backtracks": torch.tensor(float(step.backtracks)),
            "train/trpo_accepted": torch.tensor(step.accepted),
        }

    def _value_step(self, query: Rollout, optimizer: Any) -> PPOLoss:
        """One Adam step on the value loss alone (after a TRPO step). The inner step adapts on the
        policy loss only, so the critic's parameters are the same before and after adaptation."""
        optimizer.zero_grad(set_to_none=True)
        theta = stack_for_agents(self._meta_parameters(), query.rewards.shape[0])
        loss = agents_ppo_loss(self.policy, theta, query, self.ppo)
        with self._no_backward_sync():
            self.manual_backward(self.ppo.value_coef * loss.value)
        self._all_reduce_gradients()
        return loss

    def _outer_minibatches(self, num_agents: int, num_envs: int) -> list[tuple[slice, slice]]:
        """``(agents, envs)`` ranges of the outer optimiser steps of one PPO epoch."""
        groups = self.hparams.get("outer_env_minibatches", 1)
        require(
            num_envs % groups == 0,
            "model.outer_env_minibatches",
            f"{groups} does not divide the {num_envs} envs per task (data.envs_per_task)",
        )
        size = num_envs // groups
        env_slices = [slice(start, start + size) for start in range(0, num_envs, size)]
        return [(a, e) for a in agent_chunks(num_agents, self.hparams.get("outer_minibatch_size")) for e in env_slices]

    def _outer_step(
        self, support: Rollout, query: Rollout, optimizer: Any, may_stop: bool
    ) -> tuple[PPOLoss, torch.Tensor] | None:
        """One optimiser step on the outer loss of these agents; ``None`` when the KL stop refuses it.

        Returns the loss (as computed before the step) and the gradient norm before clipping.
        """
        chunked = len(agent_chunks(query.rewards.shape[0], self.hparams.get("agent_chunk_size"))) > 1
        optimizer.zero_grad(set_to_none=True)
        # Chunks take their backward as they go (that is the memory saving); then the KL stop
        # below can only discard the gradient, where the one-piece path never computes it.
        loss = self._outer_loss(support, query, backward=chunked)
        if may_stop and self._kl_too_large(loss.approx_kl):
            optimizer.zero_grad(set_to_none=True)
            return None
        if not chunked:
            with self._no_backward_sync():
                self.manual_backward(loss.total)
        self._all_reduce_gradients()
        grad_norm = self._clip_gradients()
        optimizer.step()
        return loss, grad_norm

    def _outer_loss(self, support: Rollout, query: Rollout, backward: bool) -> PPOLoss:
        """The outer PPO loss of every agent under its theta_k', over ``agent_chunk_size`` agents at a time.

        With ``backward`` each chunk's ``(|c| / K) * loss`` is back-propagated at once and the returned
        loss is detached; without, the one chunk's loss keeps its graph for the caller's backward.
        """
        num_agents = query.rewards.shape[0]
        exploration_coef = self.hparams.get("exploration_coef", 0.0)
        # Normalised over all agents of this step before chunking: chunks must not change the term.
        agent_advantages = post_adaptation_advantages(query.episode_return) if exploration_coef > 0 else None
        parts: list[tuple[float, PPOLoss]] = []
        for index in agent_chunks(num_agents, self.hparams.get("agent_chunk_size")):
            chunk_support, chunk_query = support.agents(index), query.agents(index)
            size = chunk_query.rewards.shape[0]
            theta = stack_for_agents(self._meta_parameters(), size)
            adapted = self._adapt(theta, chunk_support, first_order=self.hparams.first_order)
            loss = agents_ppo_loss(self.policy, adapted, chunk_query, self.ppo, with_value=self.uses_critic)
            if agent_advantages is not None:
                explore = exploration_loss(self.policy, theta, chunk_support, agent_advantages[index], self.ppo.clip_epsilon)
                loss = loss._replace(total=loss.total + exploration_coef * explore)
            weight = size / num_agents
            if backward:
                with self._no_backward_sync():
                    self.manual_backward(weight * loss.total)
                loss = PPOLoss(*(term.detach() for term in loss))
            parts.append((weight, loss))
        return weighted_mean_loss(parts)

    @staticmethod
    def _trial_metrics(prefix: str, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Return of the first and the last episode of the trials (trial memory only): the
        in-context gain, without a gradient step, is the difference."""
        returns = rollout.trial_episode_returns()
        if len(returns) < 2:
            return {}
        return {f"{prefix}/trial_first_episode_return": returns[0], f"{prefix}/trial_last_episode_return": returns[-1]}

    # ------------------------------------------------------------------------ distributed helpers
    def _no_backward_sync(self) -> contextlib.AbstractContextManager:
        """Keep DDP's reducer out of the backward: it does not sync grad-of-grad (pytorch#47562).

        The meta-gradient is computed locally and all-reduced once by :meth:`_all_reduce_gradients`,
        which is right for first and second order alike.
        """
        strategy = self.trainer.strategy
        block = getattr(strategy, "block_backward_sync", None)
        return block() if callable(block) and self.trainer.world_size > 1 else contextlib.nullcontext()

    def _mean_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over this run's ranks (itself on one process)."""
        return mean_over_ranks(tensor, self.trainer.world_size)

    def _all_reduce_gradients(self) -> None:
        """Average the meta-gradient over ranks (:func:`~metarl_lightning.distributed.all_reduce_gradients`)."""
        all_reduce_gradients(self.parameters(), self.trainer.world_size)

    def _kl_too_large(self, approx_kl: torch.Tensor) -> bool:
        """Early stop of the outer PPO epochs once the policy moved too far from the acting one.

        Averaged over ranks first, so every rank takes the same number of optimiser steps.
        """
        target = self.hparams.target_kl
        if target is None:
            return False
        return bool(self._mean_over_ranks(approx_kl.detach()) > 1.5 * target)

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.parameters() if p.grad is not None]
        max_norm = self.hparams.max_grad_norm
        if max_norm is None:
            return torch.norm(torch.stack([p.grad.norm() for p in params]))
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # ---------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: MetaBatch, prefix: str) -> None:
        datamodule = self.trainer.datamodule
        with torch.enable_grad():
            support, query = self.adapt_and_collect(
                batch, datamodule.eval_collector, datamodule.eval_rollout_steps, getattr(datamodule, "query_state", "fresh")
            )
        world = self.trainer.world_size
        metrics = {
            f"{prefix}/pre_adaptation_return": support.episode_return.mean(),
            f"{prefix}/post_adaptation_return": query.episode_return.mean(),
            f"{prefix}/pre_adaptation_success": support.episode_success.mean(),
            f"{prefix}/post_adaptation_success": query.episode_success.mean(),
            **self._trial_metrics(prefix, query),
        }
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=world > 1, batch_size=batch.num_agents)

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        """Adapt to held-out (test-split) tasks and log pre/post-adaptation return and success."""
        self._evaluate(batch, "val")

    def test_step(self, batch: MetaBatch, batch_idx: int) -> None:
        """Same as validation, logged under ``test/``."""
        self._evaluate(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the policy class so a checkpoint says what it holds."""
        checkpoint["policy_class"] = f"{type(self.policy).__module__}.{type(self.policy).__qualname__}"
