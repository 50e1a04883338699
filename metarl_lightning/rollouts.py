"""The multi-agent rollout collector.

``K`` task-agents each act with their own (possibly adapted) parameters in their own
``E`` environments; all ``K * E`` environments step together. The policy runs once per step for all
agents through its acting step (``ActorCritic.acting_step``: parameters prepared once per rollout,
agents batched by matmul), so the Python cost per step does not grow with ``K`` or ``E``.
Rollouts come back as tensors shaped ``[K, E, T, ...]`` together with the recurrent state at the
start, so training can recompute exactly what the policy computed while acting.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from metarl_lightning.algorithms.ppo import LOG_SQRT_2PI
from metarl_lightning.envs.base import StepResult, TaskVectorEnv
from metarl_lightning.envs.context import context_dim, context_features
from metarl_lightning.observation_normalizer import ObservationNormalizer
from metarl_lightning.policies.base import ActorCritic
from metarl_lightning.policies.acting import ActingStep
from metarl_lightning.rollout_data import Rollout
from metarl_lightning.rollout_values import rollout_values
from metarl_lightning.trials import value_boundaries

ResetMode = Literal["episode", "trial"]


def act_step(
    acting: ActingStep,
    obs: torch.Tensor,
    state: Any,
    reset: torch.Tensor,
    noise: torch.Tensor,
    action_limit: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """One acting step of every agent: policy step, Gaussian sample, clip.

    Args:
        acting: the rollout's prepared policy step (``ActorCritic.acting_step``).
        obs: ``[K, E, D]``; state: the step's state; reset: ``[K, E]`` bool; noise: ``[K, E, A]``.
        action_limit: the env's action box half-width.
        deterministic: act with the mean.

    Returns:
        ``(action [K,E,A] unclipped, clipped [K,E,A], log_std (broadcastable), value [K,E], state)``.
        The log-probability is left to the caller: with ``action = mean + std * noise`` it depends
        on the noise and ``log_std`` only, so it is computed for the whole rollout in one op.
    """
    out = acting(obs, state, reset)
    action = out.mean if deterministic else torch.addcmul(out.mean, out.log_std.exp(), noise)
    return action, action.clamp(-action_limit, action_limit), out.log_std, out.value, out.state


class _SyncStepper:
    """One lane over ``env.step``, for envs without split-phase stepping (nav2d, in-process envs)."""

    def __init__(self, env: TaskVectorEnv) -> None:
        self.env, self.lanes = env, [(0, env.num_agents)]
        self._actions: np.ndarray | None = None

    def step_async(self, actions: np.ndarray, lane: int) -> None:
        self._actions = actions

    def step_wait(self, lane: int) -> StepResult:
        return self.env.step(self._actions)


class _Lane:
    """The agents ``[start, stop)`` of one env lane: their acting step, state and episode tallies.

    Env-side results are kept as numpy ``[T, N_lane]`` arrays and turned into tensors once, after
    the rollout.
    """

    def __init__(self, index: int, start: int, stop: int, envs_per_agent: int, num_steps: int, acting: ActingStep) -> None:
        self.index, self.agents, self.acting = index, slice(start, stop), acting
        n = (stop - start) * envs_per_agent
        self.shape = (stop - start, envs_per_agent)
        self.state = self.next_state = acting.initial_state()
        self.obs: torch.Tensor | None = None  # the policy input (with context inputs, if any)
        self.sent_action: np.ndarray | None = None  # [N_lane, A] clipped, as the env got it
        self.reset: torch.Tensor | None = None
        self.no_reset: torch.Tensor | None = None
        self.final_context: torch.Tensor | None = None  # [K_lane, E, C], with context inputs
        self.rewards = np.empty((num_steps, n), dtype=np.float32)
        self.successes = np.empty((num_steps, n), dtype=bool)
        self.terminated = np.empty((num_steps, n), dtype=bool)
        self.truncated = np.empty((num_steps, n), dtype=bool)
        self.resets = np.empty((num_steps, n), dtype=bool)
        self.resets[0] = True
        self.episode_return, self.episode_success = np.zeros(n), np.zeros(n, dtype=bool)
        self.return_sum, self.success_sum, self.episodes = np.zeros(n), np.zeros(n), np.zeros(n)

    def tally(self, t: int, result: StepResult) -> np.ndarray:
        """Record the env side of step ``t``; returns which envs finished an episode (``episodes``
        then counts it)."""
        self.rewards[t], self.terminated[t], self.truncated[t] = result.reward, result.terminated, result.truncated
        self.successes[t] = result.success
        self.episode_return += result.reward
        self.episode_success |= result.success
        done = result.terminated | result.truncated
        if done.any():
            self.return_sum[done] += self.episode_return[done]
            self.success_sum[done] += self.episode_success[done]
            self.episodes[done] += 1
            self.episode_return[done] = 0.0
            self.episode_success[done] = False
        return done

    def per_env_means(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean return and success over each env's finished episodes (the partial one if none)."""
        unfinished = self.episodes == 0
        return_sum, success_sum = self.return_sum.copy(), self.success_sum.copy()
        return_sum[unfinished] = self.episode_return[unfinished]
        success_sum[unfinished] = self.episode_success[unfinished]
        return return_sum / np.maximum(self.episodes, 1), success_sum / np.maximum(self.episodes, 1)


class RolloutCollector:
    """Steps a :class:`TaskVectorEnv` with per-agent parameters of one policy architecture.

    With ``pipeline`` and an env that offers lanes (``MetaWorldVectorEnv`` with two or more
    workers: two agent ranges, each stepped by its own workers, via ``step_async`` /
    ``step_wait``), the collector computes one lane's actions while the other lane's workers step,
    so learner time overlaps env time. Results are identical to stepping all envs at once
    (tested). It pays off when each step has enough env work to hide a half-size policy call: on
    the 2-core box it lifted the S5 collector from ~0.75 to 0.81-0.86 of random stepping at ~100
    envs per step, and did not pay at 20 (two half calls cost more than one; README, benchmarks).

    Args:
        env: the environments (``num_agents x envs_per_agent``).
        reset_state_on: ``"episode"`` zeroes the recurrent state at every episode start (plain
            MAML); ``"trial"`` only at trial starts, so memory spans the episodes of one task
            (in-context adaptation, alone or on top of MAML). Inside a trial episode ends are not
            ends of the return either (:func:`value_boundaries`).
        episodes_per_trial: with ``"trial"``: a trial is this many consecutive episodes of one env;
            ``None``: the env's whole rollout is one trial.
        context_reward_scale: append the context inputs (previous action, previous reward times
            this scale, done flag: :mod:`metarl_lightning.envs.context`) to every observation,
            zeroed wherever the state is (trial starts, and every rollout start: a task change);
            ``None``: bare observations.
        context_action_scale: multiplies the previous-action inputs (0: always 0; see
            :func:`~metarl_lightning.envs.context.context_features`).
        action_limit: actions sent to the env are clipped to ``[-action_limit, action_limit]``.
        compile_policy: run the acting step through ``torch.compile`` (one compile per input shape,
            seconds each on a CPU). The native steps of the MLP and SSM policies gain nothing from it
            (compute-bound, measured); it helps policies on the generic vmap path (GRU, custom).
        pipeline: overlap acting and env stepping across lanes when the env has them.
        values_after_rollout: with ``reset_state_on: episode``, act with the actor only and
            compute every value (and the bootstrap values) after the rollout in one sequence
            forward (:mod:`metarl_lightning.rollout_values`); it halves the per-step policy work of
            the actor-critic policies. ``False`` runs the critic in every acting step.
        acting_threads: torch threads while stepping (``None``: leave as is). With env worker
            processes on the same cores, 1 avoids the learner's threads competing with them; the
            values after the rollout (workers idle) and the caller's meta-update use all threads.
    """

    def __init__(
        self,
        env: TaskVectorEnv,
        reset_state_on: ResetMode = "episode",
        action_limit: float = 1.0,
        compile_policy: bool = False,
        pipeline: bool = False,
        values_after_rollout: bool = True,
        acting_threads: int | None = None,
        episodes_per_trial: int | None = None,
        context_reward_scale: float | None = None,
        context_action_scale: float = 1.0,
    ) -> None:
        if reset_state_on not in ("episode", "trial"):
            raise ValueError(f"reset_state_on: expected 'episode' or 'trial', got {reset_state_on!r}")
        if episodes_per_trial is not None and (reset_state_on != "trial" or episodes_per_trial < 1):
            raise ValueError(f"episodes_per_trial: needs reset_state_on='trial' and a value >= 1, got {episodes_per_trial}")
        self.env = env
        self.reset_state_on = reset_state_on
        self.episodes_per_trial = episodes_per_trial
        self.context_reward_scale = context_reward_scale
        self.context_action_scale = context_action_scale
        self.action_limit = action_limit
        self.pipeline = pipeline
        self.acting_threads = acting_threads
        # A trial-long state cannot take the inserted final observations (see rollout_values).
        self.values_after_rollout = values_after_rollout and reset_state_on == "episode"
        self._act = torch.compile(act_step, dynamic=False) if compile_policy else act_step

    @property
    def observation_dim(self) -> int:
        """Size of the policy input: the env's observation plus the context inputs, if any."""
        extra = 0 if self.context_reward_scale is None else context_dim(self.env.action_dim)
        return self.env.observation_dim + extra

    def _context(self, sent_action: np.ndarray, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        """The context inputs the next observation carries (the actions were clipped when sent)."""
        assert self.context_reward_scale is not None
        return context_features(sent_action, reward, done, self.context_reward_scale, action_scale=self.context_action_scale)

    def _trial_starts(self, lane: _Lane, done: np.ndarray) -> np.ndarray:
        """Which envs start a new trial (state and context zeroed) after a step that ended ``done``."""
        if self.reset_state_on == "episode":
            return done
        if self.episodes_per_trial is None:
            return np.zeros_like(done)
        return done & (lane.episodes % self.episodes_per_trial == 0)

    @staticmethod
    def _policy_input(
        obs: np.ndarray, context: np.ndarray | None, normalizer: ObservationNormalizer | None = None, record: bool = False
    ) -> np.ndarray:
        """Env observations ``[N, D]`` with the context inputs appended (when they are on), standardised
        by ``normalizer`` (when given; ``record``: the raw ones also go into its pending statistics)."""
        policy_input = obs if context is None else np.concatenate([obs, context], axis=1)
        if normalizer is None:
            return policy_input
        if record:
            normalizer.record(policy_input)
        return normalizer.normalize(policy_input)

    @torch.no_grad()
    def collect(
        self,
        policy: ActorCritic,
        stacked_params: dict[str, torch.Tensor] | None,
        num_steps: int,
        action_noise: torch.Tensor,
        deterministic: bool = False,
        start_state: torch.Tensor | None = None,
        start_context: torch.Tensor | None = None,
        with_values: bool = True,
        obs_normalizer: ObservationNormalizer | None = None,
        record_observations: bool = False,
    ) -> Rollout:
        """Reset every env and act for ``num_steps`` steps.

        A rollout starts a new trial in every env (the task may have changed), unless
        ``start_state`` continues one: then the state is not zeroed before step 0
        (``resets[..., 0]`` false) and the first step's context inputs are ``start_context`` (a
        finished rollout's ``final_context``); the first episode of this rollout counts as the
        first of its trial for ``episodes_per_trial``.

        Args:
            policy: the policy module.
            stacked_params: name -> ``[K, *shape]``, agent ``k``'s parameters; ``None``: every agent
                acts with the policy's own parameters (the support rollouts with theta).
            num_steps: steps per env ``T`` (a multiple of the episode length gives whole episodes).
            action_noise: ``[K, E, T, A]`` standard-normal noise; passing it in makes the
                exploration reproducible and independent of how agents are split over ranks.
            deterministic: act with the mean (evaluation).
            start_state: ``[K, E, *S]`` state to start from, in the policy's sequence layout
                (``PolicyOutput.state``); ``None``: zeros and a new trial.
            start_context: ``[K, E, C]`` context inputs of step 0 when ``start_state`` is given (and
                the collector appends context inputs).
            with_values: compute the critic's values (and bootstrap values); ``False`` leaves them
                zero and never runs the critic, for a caller whose advantages use a linear
                baseline and who trains no critic.
            obs_normalizer: standardise the env observations the policy sees (and the rollout
                stores) with these statistics (:mod:`metarl_lightning.observation_normalizer`).
            record_observations: add the raw observations the policy acts on (the ``K x E x T``
                the rollout stores) to the normaliser's pending statistics (training rollouts).

        Returns:
            The :class:`Rollout` (advantages not yet computed).
        """
        env, K, E, A = self.env, self.env.num_agents, self.env.envs_per_agent, self.env.action_dim
        device = action_noise.device
        dtype = next(iter((stacked_params or dict(policy.named_parameters())).values())).dtype
        stepper = env if self.pipeline and len(getattr(env, "lanes", ())) > 1 else _SyncStepper(env)
        lanes = []
        for index, (start, stop) in enumerate(stepper.lanes):
            params = None if stacked_params is None else {n: p[start:stop] for n, p in stacked_params.items()}
            acting = policy.acting_step(params, stop - start, E, with_values=with_values and not self.values_after_rollout)
            lane = _Lane(index, start, stop, E, num_steps, acting)
            if start_state is not None:
                lane.state = acting.initial_state(start_state[start:stop])
                lane.resets[0] = False
            lanes.append(lane)

        # Per step the learner only acts and stores three tensors; everything derivable from the
        # whole rollout (log-probs, next values, the env-side tensors) is done once after the loop.
        # Every microsecond here is paid once per env step unless the other lane's workers run.
        shape = (K, E, num_steps)
        observations = torch.empty(*shape, self.observation_dim, dtype=dtype, device=device)
        actions = torch.empty(*shape, A, dtype=dtype, device=device)
        values = torch.empty(shape, dtype=dtype, device=device)
        log_std_sums = torch.empty(shape, dtype=dtype, device=device)
        # Value of the final observation of episodes cut by the time limit (zero elsewhere), or
        # with values after the rollout, those final observations.
        truncation_values = torch.zeros(shape, dtype=dtype, device=device)
        final_observations = torch.zeros_like(observations) if self.values_after_rollout and with_values else None
        if not with_values:
            values.zero_()

        def to_tensor(array: np.ndarray, lane: _Lane) -> torch.Tensor:
            return torch.as_tensor(array, device=device).reshape(*lane.shape, *array.shape[1:])

        def act(lane: _Lane, obs: torch.Tensor, state: Any, reset: torch.Tensor, t: int):
            noise = action_noise[lane.agents, :, t]
            return self._act(lane.acting, obs, state, reset, noise, self.action_limit, deterministic)

        with_context = self.context_reward_scale is not None

        def policy_input(obs: np.ndarray, context: np.ndarray | None, acted_on: bool = True) -> np.ndarray:
            # Only observations the policy acts on feed the statistics (not the final observations
            # of truncated episodes, nor the one after the last step: they only bootstrap values).
            return self._policy_input(obs, context, obs_normalizer, record_observations and acted_on)

        def act_and_send(lane: _Lane, t: int) -> None:
            action, clipped, log_std, value, lane.next_state = act(lane, lane.obs, lane.state, lane.reset, t)
            lane.sent_action = clipped.reshape(-1, A).cpu().numpy()
            stepper.step_async(lane.sent_action, lane.index)
            observations[lane.agents, :, t] = lane.obs
            actions[lane.agents, :, t] = action
            if value is not None:
                values[lane.agents, :, t] = value
            log_std_sums[lane.agents, :, t] = log_std.sum(-1)

        def receive(lane: _Lane, t: int) -> None:
            result = stepper.step_wait(lane.index)
            done = lane.tally(t, result)
            starts = self._trial_starts(lane, done)
            # Only truncations that end the return bootstrap (value_boundaries): inside a trial the
            # next episode's first value follows instead.
            bootstrapped = result.truncated if (self.reset_state_on == "episode" or t + 1 == num_steps) else result.truncated & starts
            if with_values and bootstrapped.any():
                # The last observation before the automatic reset, for the bootstrap value; its
                # context is this step's (not an episode start: done 0).
                final_context = None
                if with_context:
                    final_context = self._context(lane.sent_action, result.reward, np.zeros_like(done))
                final_obs = to_tensor(policy_input(result.final_observation, final_context, acted_on=False), lane).to(dtype)
                if final_observations is not None:
                    final_observations[lane.agents, :, t] = final_obs
                else:
                    final_value = act(lane, final_obs, lane.next_state, lane.no_reset, t)[3]
                    truncated = to_tensor(bootstrapped, lane)
                    truncation_values[lane.agents, :, t] = torch.where(truncated, final_value, 0.0)
            resetting = starts.any()
            if t + 1 < num_steps:
                lane.resets[t + 1] = starts
            lane.reset = to_tensor(starts, lane) if resetting else lane.no_reset
            lane.state = lane.next_state
            context = None
            if with_context:
                context = self._context(lane.sent_action, result.reward, done)
                if t + 1 == num_steps:
                    lane.final_context = to_tensor(context.copy(), lane).to(dtype)  # before any trial start
                context[starts] = 0.0  # a new trial: nothing happened yet
            lane.obs = to_tensor(policy_input(result.observation, context, acted_on=t + 1 < num_steps), lane).to(dtype)

        # A rollout starts a trial (the task may have changed): zero context inputs; or goes on
        # with the trial of ``start_state``.
        reset_obs = env.reset()
        first_context = None
        if with_context and start_state is None:
            first_context = np.zeros((len(reset_obs), context_dim(A)), dtype=np.float32)
        elif with_context:
            if start_context is None:
                raise ValueError("collect: start_state needs start_context when the collector appends context inputs")
            first_context = start_context.reshape(len(reset_obs), -1).cpu().numpy().astype(np.float32)
            first_context[:, -1] = 1.0  # the reset above starts a new episode of the trial
        first_obs = torch.as_tensor(policy_input(reset_obs, first_context), device=device).to(dtype).reshape(K, E, -1)
        threads = torch.get_num_threads()
        if self.acting_threads is not None:
            torch.set_num_threads(self.acting_threads)
        try:
            # Inference mode skips autograd's per-op bookkeeping (version counters, view tracking):
            # the S5 acting step alone took 133 vs 146-152 us (5 agents x 10 envs, 1 thread; cache-cold
            # 265-270 vs 286-320 us). Only storage allocated outside is written in place, so
            # everything the Rollout returns stays a normal tensor for training.
            with torch.inference_mode():
                for lane in lanes:
                    lane.obs = first_obs[lane.agents]
                    lane.reset = torch.full(lane.shape, start_state is None, dtype=torch.bool, device=device)
                    lane.no_reset = torch.zeros(lane.shape, dtype=torch.bool, device=device)
                    act_and_send(lane, 0)
                for t in range(num_steps):
                    for lane in lanes:  # while this lane is handled, the other lanes' workers step
                        receive(lane, t)
                        if t + 1 < num_steps:
                            act_and_send(lane, t + 1)
        finally:
            torch.set_num_threads(threads)

        def steps_last(arrays: list[np.ndarray]) -> torch.Tensor:
            """Lanes' ``[T, N_lane]`` numpy arrays -> ``[K, E, T]`` tensor."""
            return torch.as_tensor(np.concatenate(arrays, axis=1).T.reshape(K, E, num_steps).copy(), device=device)

        terminated = steps_last([lane.terminated for lane in lanes])
        truncated = steps_last([lane.truncated for lane in lanes])
        resets = steps_last([lane.resets for lane in lanes])
        # Training recomputes from the state the rollout started from.
        if start_state is not None:
            initial_state = start_state.to(dtype)
        else:
            initial_state = policy.initial_state(K * E, device=device).to(dtype)
            initial_state = initial_state.reshape(K, E, *initial_state.shape[1:])
        if final_observations is not None:
            last_obs, last_reset = torch.cat([lane.obs for lane in lanes]), torch.cat([lane.reset for lane in lanes])
            values, truncation_values, last_value = rollout_values(
                policy, stacked_params, observations, resets, truncated, final_observations, last_obs, last_reset, initial_state
            )
        elif with_values:
            # Bootstrap the step after the last one where the episode is still running.
            last_value = torch.cat([act(lane, lane.obs, lane.state, lane.reset, num_steps - 1)[3] for lane in lanes])
        else:
            last_value = values.new_zeros(K, E)
        # Inside an episode (and inside a trial) the next value is the next step's value; at a
        # time-limit cut that ends the return, the final observation's value; after a termination
        # zero (truncation_values is zero there).
        following = torch.cat([values[:, :, 1:], last_value.unsqueeze(-1)], dim=-1)
        ends_terminated, ends_truncated = value_boundaries(terminated, truncated, resets)
        next_values = torch.where(ends_terminated | ends_truncated, truncation_values, following)
        # action = mean + std * noise, so its Gaussian log-density needs only the noise and log-std.
        noise_term = 0.0 if deterministic else -0.5 * action_noise[:, :, :num_steps].square().sum(-1)
        log_probs = noise_term - log_std_sums - A * LOG_SQRT_2PI

        per_env_return, per_env_success = (np.concatenate(parts) for parts in zip(*(lane.per_env_means() for lane in lanes)))
        return Rollout(
            observations=observations,
            actions=actions,
            log_probs=log_probs,
            values=values,
            next_values=next_values,
            rewards=steps_last([lane.rewards for lane in lanes]).to(dtype),
            terminated=terminated,
            truncated=truncated,
            resets=resets,
            initial_state=initial_state,
            episode_return=torch.as_tensor(per_env_return.reshape(K, E).mean(1), dtype=dtype, device=device),
            episode_success=torch.as_tensor(per_env_success.reshape(K, E).mean(1), dtype=dtype, device=device),
            final_context=torch.cat([lane.final_context for lane in lanes]) if with_context else None,
            successes=steps_last([lane.successes for lane in lanes]),
        )
