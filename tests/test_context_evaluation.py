"""In-context agents through Meta-World's official protocol (``metalearning_evaluation`` unchanged).

The adapter is replayed: every observation the protocol handed the agent is recorded per task (between
``init()`` calls) and run through the policy's ``forward`` as one sequence from the zero state. The
agent's actions must match that replay, so the state was carried across every adaptation and
evaluation episode of a task and zeroed at the task change. The context inputs on the eval envs are
checked against the rewards and dones the env really produced (a spy under the wrapper).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from metaworld.policies import SawyerReachV3Policy
from torch.func import functional_call

from metarl_lightning.algorithms.ppo import gaussian_log_prob
from metarl_lightning.envs.benchmarks import make_benchmark
from metarl_lightning.envs.context import ContextObservation
from metarl_lightning.evaluation import make_eval_envs, run_meta_learning
from metarl_lightning.evaluation_agent import MetaWorldAgent
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import SSMActorCritic
from tests.test_evaluation import ScriptedAgent

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
OBS, CONTEXT, SCALE, STEPS = 39, 6, 0.1, 8
ADAPTATION_EPISODES, EVALUATION_EPISODES, NUM_EVALS = 2, 1, 2


class StepSpy(gym.vector.VectorWrapper):
    """Records the rewards and dones of every step, under the context wrapper."""

    def __init__(self, env: gym.vector.VectorEnv) -> None:
        super().__init__(env)
        self.log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.env.call(name, *args, **kwargs)

    def get_attr(self, name: str) -> Any:
        return self.env.get_attr(name)

    def step(self, actions: np.ndarray) -> Any:
        result = self.env.step(actions)
        self.log.append((np.array(actions), np.array(result[1]), np.logical_or(result[2], result[3])))
        return result


class RecordingAgent(MetaWorldAgent):
    """Keeps, per task, what the agent was shown and what it answered."""

    def init(self) -> None:
        super().init()
        self.tasks = [*getattr(self, "tasks", []), []]

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        actions, aux = super().adapt_action(observations)
        self.tasks[-1].append(("adapt", np.array(observations), actions, aux, self._params_now()))
        return actions, aux

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        actions = super().eval_action(observations)
        self.tasks[-1].append(("eval", np.array(observations), actions, None, self._params_now()))
        return actions

    def _params_now(self) -> dict[str, torch.Tensor]:
        return {k: v[0].clone() for k, v in self.params.items()}  # one env (ML1: one test class)


def _module(inner_steps: int) -> MetaRLModule:
    torch.manual_seed(0)
    policy = SSMActorCritic(OBS + CONTEXT, 4, hidden_dim=16, state_dim=8, num_layers=1)
    with torch.no_grad():  # off the initial values, so that memory visibly changes the actions
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return MetaRLModule(policy, inner_steps=inner_steps, inner_lr=0.5)


def _run(
    inner_steps: int, trial_memory: bool, eval_state: str = "carry", evaluation_episodes: int = EVALUATION_EPISODES
) -> tuple[RecordingAgent, StepSpy, MetaRLModule]:
    torch.set_num_threads(1)
    module = _module(inner_steps)
    envs = make_eval_envs(make_benchmark("ML1", "reach-v3", seed=0), "test", seed=0, max_episode_steps=STEPS)
    spy = StepSpy(envs)
    wrapped = ContextObservation(spy, SCALE)
    try:
        agent = RecordingAgent(module, wrapped.num_envs, trial_memory=trial_memory, eval_state=eval_state)
        agent.tasks = []  # the constructor's own init() is not a task of the protocol
        run_meta_learning(agent, wrapped, NUM_EVALS, ADAPTATION_EPISODES, evaluation_episodes)
    finally:
        wrapped.close()
    return agent, spy, module


def _replay(
    module: MetaRLModule, task: list, reset_every_episode: bool, restore_adapted: bool = False
) -> list[torch.Tensor]:
    """The policy's means over one task's observations, step by step from the zero state.

    ``restore_adapted``: every evaluation episode starts from the state the adaptation phase left.
    """
    policy = module.policy
    state = policy.initial_state(1)
    means = []
    adapted = None
    for step, (phase, obs, _, _, params) in enumerate(task):
        starts_episode = step == 0 or obs[0, -1] == 1.0 or (phase == "eval" and task[step - 1][0] == "adapt")
        if phase == "eval" and task[step - 1][0] == "adapt":
            adapted = state
        if restore_adapted and phase == "eval" and starts_episode:
            state = adapted
        reset = torch.tensor([[step == 0 or (reset_every_episode and starts_episode)]])
        out = functional_call(policy, params, (torch.as_tensor(obs, dtype=torch.float32).unsqueeze(1), state, reset))
        state = out.state
        means.append(out.mean[:, 0])
    return means


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_trial_memory_agent_carries_the_state_over_every_episode_of_a_task(inner_steps: int) -> None:
    agent, _, module = _run(inner_steps, trial_memory=True)
    assert len(agent.tasks) == NUM_EVALS
    for task in agent.tasks:
        phases = [phase for phase, *_ in task]
        assert phases.count("adapt") == ADAPTATION_EPISODES * STEPS and phases.count("eval") == EVALUATION_EPISODES * STEPS
        means = _replay(module, task, reset_every_episode=False)
        for (phase, _, actions, aux, _), mean in zip(task, means):
            if phase == "adapt":  # sampled actions: their log-probability under the replayed mean
                raw = torch.as_tensor(aux["raw_action"])
                log_prob = gaussian_log_prob(mean, module.policy.log_std.detach().expand_as(mean), raw)
                torch.testing.assert_close(log_prob, torch.as_tensor(aux["log_prob"]), rtol=0, atol=1e-4)
            else:
                torch.testing.assert_close(torch.as_tensor(actions, dtype=torch.float32), mean.clamp(-1, 1), rtol=0, atol=1e-5)
    # A replay that zeroes the state at episode starts disagrees: the memory mattered.
    task = agent.tasks[0]
    episodic = _replay(module, task, reset_every_episode=True)
    last_eval = torch.as_tensor(task[-1][2], dtype=torch.float32)
    assert (last_eval - episodic[-1].clamp(-1, 1)).abs().max() > 1e-3
    theta = dict(module.policy.named_parameters())
    moved = sum((task[-1][4][k] - theta[k]).abs().sum().item() for k in theta)
    assert (moved > 0) == (inner_steps > 0)  # adapt() takes the inner step only when inner_steps > 0


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_adapted_eval_state_starts_every_evaluation_episode_from_the_adapted_state(inner_steps: int) -> None:
    agent, _, module = _run(inner_steps, trial_memory=True, eval_state="adapted", evaluation_episodes=3)
    for task in agent.tasks:
        assert [phase for phase, *_ in task].count("eval") == 3 * STEPS
        means = _replay(module, task, reset_every_episode=False, restore_adapted=True)
        for (phase, _, actions, _, _), mean in zip(task, means):
            if phase == "eval":
                torch.testing.assert_close(torch.as_tensor(actions, dtype=torch.float32), mean.clamp(-1, 1), rtol=0, atol=1e-5)
    # Carrying the state on through the evaluation episodes acts differently in the later ones.
    carried = _replay(module, agent.tasks[0], reset_every_episode=False)
    last_eval = torch.as_tensor(agent.tasks[0][-1][2], dtype=torch.float32)
    assert (last_eval - carried[-1].clamp(-1, 1)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eval_state"):
        MetaWorldAgent(module, 1, eval_state="fresh")


def test_episode_memory_agent_zeroes_the_state_at_every_episode() -> None:
    agent, _, module = _run(inner_steps=1, trial_memory=False)
    for task in agent.tasks:
        means = _replay(module, task, reset_every_episode=True)
        for (phase, _, actions, _, _), mean in zip(task, means):
            if phase == "eval":
                torch.testing.assert_close(torch.as_tensor(actions, dtype=torch.float32), mean.clamp(-1, 1), rtol=0, atol=1e-5)


def test_eval_context_inputs_line_up_with_the_env_steps() -> None:
    agent, spy, _ = _run(inner_steps=0, trial_memory=True)
    shown = [obs for task in agent.tasks for _, obs, *_ in task]
    first_of_task = np.cumsum([0] + [len(task) for task in agent.tasks])[:-1]
    assert len(shown) == len(spy.log)
    for t, obs in enumerate(shown):
        context = obs[0, OBS:]
        if t in first_of_task:  # a task change: a new trial
            np.testing.assert_array_equal(context, np.zeros(CONTEXT))
            continue
        action, reward, done = spy.log[t - 1]
        np.testing.assert_allclose(context[:4], np.clip(action[0], -1, 1), rtol=1e-6)
        np.testing.assert_allclose(context[4], SCALE * reward[0], rtol=1e-5)
        assert context[5] == float(done[0])
    # Evaluation starts a new episode of the same task: the flag says so, the rest carries over.
    eval_start = [i for i, (phase, *_) in enumerate(agent.tasks[0]) if phase == "eval"][0]
    assert agent.tasks[0][eval_start][1][0, -1] == 1.0


def test_eval_wrapper_with_action_scale_zero_shows_no_action() -> None:
    envs = make_eval_envs(make_benchmark("ML1", "reach-v3", seed=0), "test", seed=0, max_episode_steps=STEPS,
                          context_reward_scale=SCALE, context_action_scale=0.0)
    try:
        envs.call("sample_tasks")
        envs.reset(seed=0)
        obs, reward, *_ = envs.step(np.full((envs.num_envs, 4), 0.7))
    finally:
        envs.close()
    np.testing.assert_array_equal(obs[:, OBS : OBS + 4], 0.0)
    np.testing.assert_allclose(obs[:, OBS + 4], SCALE * reward, rtol=1e-5)


class _FirstObservationsOnly:
    """A protocol agent that hides the context inputs from the scripted expert."""

    def __init__(self, agent: ScriptedAgent) -> None:
        self.agent = agent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.agent, name)

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        assert observations.shape[1] == OBS + CONTEXT
        return self.agent.eval_action(observations[:, :OBS])

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.eval_action(observations), {}


def test_scripted_expert_still_succeeds_through_the_context_wrapper() -> None:
    envs = make_eval_envs(make_benchmark("ML1", "reach-v3", seed=0), "test", seed=0, max_episode_steps=150, context_reward_scale=SCALE)
    try:
        agent = _FirstObservationsOnly(ScriptedAgent(SawyerReachV3Policy(), envs))
        result = run_meta_learning(agent, envs, num_evals=2, adaptation_episodes=1, evaluation_episodes=3)
    finally:
        envs.close()
    assert result["success_rate"] == 1.0, result


def test_evaluation_callback_evaluates_with_the_data_modules_in_context_settings() -> None:
    from types import SimpleNamespace

    from callbacks.evaluation import MetaWorldEvaluation

    dm = SimpleNamespace(benchmark="ML1", env_name="reach-v3", seed=0, max_episode_steps=500, fast_envs=True,
                         benchmark_cache_dir=None, task_one_hot=False, context_inputs=True, context_reward_scale=0.1,
                         reset_state_on="trial")
    settings = MetaWorldEvaluation()._settings(SimpleNamespace(datamodule=dm))
    assert settings["context_reward_scale"] == 0.1 and settings["trial_memory"] is True
    assert settings["context_action_scale"] == 1.0
    dm.context_action_scale = 0.0
    assert MetaWorldEvaluation()._settings(SimpleNamespace(datamodule=dm))["context_action_scale"] == 0.0
    dm.context_inputs, dm.reset_state_on = False, "episode"
    settings = MetaWorldEvaluation()._settings(SimpleNamespace(datamodule=dm))
    assert settings["context_reward_scale"] is None and settings["trial_memory"] is False
