"""The official Meta-World evaluation path: our env building + metaworld.evaluation + our adapter.

Oracles are Meta-World's scripted expert policies: through our envs and our wrappers of
``metaworld.evaluation`` they must succeed (>= 0.9) where a random policy does not. Episodes are
shortened (the experts finish reach/push well within 150-200 steps; terminate-on-success ends them
early) to keep the file fast.
"""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from metaworld.evaluation import Timestep
from metaworld.policies import SawyerPushV3Policy, SawyerReachV3Policy

from lightning.pytorch.trainer.states import TrainerFn

from callbacks.evaluation import MetaWorldEvaluation
from metarl_lightning.envs.benchmarks import make_benchmark
from metarl_lightning.evaluation import (
    evaluate_meta_learning,
    make_eval_envs,
    run_meta_learning,
    run_multi_task,
)
from metarl_lightning.evaluation_agent import MetaWorldAgent
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies.mlp import MLPActorCritic

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")


class ScriptedAgent:
    """Meta-World's ``MetaLearningAgent`` protocol around a scripted expert (or random actions).

    The expert reads the goal from observation slots 36:39. ML test envs zero those (the goal is
    hidden), so with ``envs`` given the agent writes each env's true goal back in: an oracle that
    needs no adaptation, which isolates the protocol plumbing (task sampling, resets, counting).
    """

    def __init__(self, expert: Any | None, envs: Any = None, seed: int = 0) -> None:
        self.expert, self.envs = expert, envs
        self.rng = np.random.default_rng(seed)
        self.adapt_calls = 0

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        if self.expert is None:
            return self.rng.uniform(-1.0, 1.0, size=(len(observations), 4))
        obs = np.array(observations, dtype=np.float64)
        if self.envs is not None:
            obs[:, 36:39] = np.stack(self.envs.get_attr("_target_pos"))
        return np.stack([self.expert.get_action(o) for o in obs])

    def reset(self, env_mask: np.ndarray) -> None:
        pass

    def init(self) -> None:
        pass

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.eval_action(observations), {}

    def step(self, timestep: Timestep) -> None:
        pass

    def adapt(self) -> None:
        self.adapt_calls += 1


EXPERTS = [("reach-v3", SawyerReachV3Policy, 150), ("push-v3", SawyerPushV3Policy, 200)]


@pytest.mark.parametrize("env_name,expert_cls,steps", EXPERTS, ids=[e[0] for e in EXPERTS])
def test_multi_task_protocol_expert_succeeds_random_does_not(env_name: str, expert_cls: type, steps: int) -> None:
    envs = make_eval_envs(make_benchmark("MT1", env_name, seed=0), "test", seed=0, max_episode_steps=steps)
    try:
        expert = run_multi_task(ScriptedAgent(expert_cls()), envs, num_episodes=10)
        random = run_multi_task(ScriptedAgent(None), envs, num_episodes=10)
    finally:
        envs.close()
    assert expert["success_per_task"] == {env_name: expert["success_rate"]}
    assert expert["success_rate"] >= 0.9, expert
    assert random["success_rate"] <= 0.2, random
    assert expert["return"] > random["return"]


@pytest.mark.parametrize("env_name,expert_cls,steps", EXPERTS, ids=[e[0] for e in EXPERTS])
def test_meta_learning_protocol_expert_succeeds_on_test_goals(env_name: str, expert_cls: type, steps: int) -> None:
    bench = make_benchmark("ML1", env_name, seed=0)
    envs = make_eval_envs(bench, "test", seed=0, max_episode_steps=steps)
    try:
        agent = ScriptedAgent(expert_cls(), envs)
        expert = run_meta_learning(agent, envs, num_evals=2, adaptation_episodes=1, evaluation_episodes=3)
        random = run_meta_learning(ScriptedAgent(None), envs, num_evals=2, adaptation_episodes=1, evaluation_episodes=3)
        # The goals in play are ML1's held-out test goals, hidden from the observation.
        current = envs.envs[0].unwrapped._last_rand_vec
        assert any(np.array_equal(current, v) for v in _rand_vecs(bench.test_tasks[env_name]))
        assert not any(np.array_equal(current, v) for v in _rand_vecs(bench.train_tasks[env_name]))
    finally:
        envs.close()
    assert agent.adapt_calls == 2
    assert expert["success_rate"] >= 0.9, expert
    assert random["success_rate"] <= 0.2, random


def _rand_vecs(tasks: list) -> list[np.ndarray]:
    """The object/goal vectors the tasks pin (what ``set_task`` freezes)."""
    return [pickle.loads(t.data)["rand_vec"] for t in tasks]


def _small_module(seed: int = 0) -> MetaRLModule:
    torch.manual_seed(seed)
    return MetaRLModule(MLPActorCritic(39, 4, hidden_dim=32), inner_lr=0.05)


def test_metaworld_agent_runs_official_ml_protocol_and_adapts_per_env() -> None:
    torch.set_num_threads(1)
    module = _small_module()
    envs = make_eval_envs(make_benchmark("ML1", "reach-v3", seed=0), "test", seed=0, max_episode_steps=50)
    try:
        agent = MetaWorldAgent(module, envs.num_envs)
        result = run_meta_learning(agent, envs, num_evals=1, adaptation_episodes=2, evaluation_episodes=2)
    finally:
        envs.close()
    assert 0.0 <= result["success_rate"] <= 1.0 and math.isfinite(result["return"])
    assert set(result["success_per_task"]) == {"reach-v3"}
    # adapt() moved the env's parameters away from theta, and theta itself is untouched.
    theta = dict(module.policy.named_parameters())
    moved = sum((agent.params[k][0] - theta[k]).abs().sum().item() for k in theta)
    assert moved > 0.0
    assert all(p.grad is None for p in module.policy.parameters())

    # The public one-call entry point: same kind of summary, repeatable, and it leaves the global
    # RNGs alone (training's exploration and exact resume must not depend on evaluating).
    rng_before = (torch.get_rng_state(), np.random.get_state()[1].copy())
    kwargs = dict(seed=0, num_evals=1, adaptation_episodes=1, evaluation_episodes=1, max_episode_steps=50)
    summary = evaluate_meta_learning(module, "ML1", "reach-v3", **kwargs)
    assert 0.0 <= summary["success_rate"] <= 1.0 and math.isfinite(summary["return"])
    assert torch.equal(rng_before[0], torch.get_rng_state())
    assert np.array_equal(rng_before[1], np.random.get_state()[1])
    assert evaluate_meta_learning(module, "ML1", "reach-v3", **kwargs) == summary


def test_adaptation_rollout_layout_and_bootstrap() -> None:
    """Two envs, hand-fed transitions: [K, 1, T] layout, resets after done, truncation bootstrap."""
    module = _small_module()
    agent = MetaWorldAgent(module, num_envs=2)
    # Non-zero inputs: the first layer's weight gradient is proportional to the observation.
    obs = np.random.default_rng(0).normal(size=(2, 39))
    dones = [(False, False), (False, True), (False, False)]
    for truncated in dones:
        actions, aux = agent.adapt_action(obs)
        assert actions.shape == (2, 4) and np.all(np.abs(actions) <= 1.0)
        agent.step(Timestep(obs, actions, np.ones(2), np.zeros(2, bool), np.array(truncated), aux))
    rollout = agent.adaptation_rollout()
    assert rollout.observations.shape == (2, 1, 3, 39) and rollout.actions.shape == (2, 1, 3, 4)
    assert rollout.resets[:, 0].tolist() == [[True, False, False], [True, False, True]]
    # Truncated at t=1: bootstrapped with V(s_1), not with the next episode's first value.
    assert torch.equal(rollout.next_values[1, 0, 1], rollout.values[1, 0, 1])
    assert torch.equal(rollout.next_values[0, 0, 1], rollout.values[0, 0, 2])
    assert torch.isfinite(rollout.advantages).all()
    agent.adapt()
    # Both envs adapted from theta on their own data: different parameters.
    assert not torch.equal(agent.params["actor.0.weight"][0], agent.params["actor.0.weight"][1])


class _LoggingModule(MetaRLModule):
    """Captures log_dict outside a Trainer."""

    logged: dict[str, float]

    def log_dict(self, metrics: dict[str, float], **kwargs: Any) -> None:  # type: ignore[override]
        self.logged = dict(metrics)


def _trainer(benchmark: str, env_name: str | None = None) -> SimpleNamespace:
    datamodule = SimpleNamespace(benchmark=benchmark, env_name=env_name, seed=0, max_episode_steps=500,
                                 fast_envs=True, benchmark_cache_dir=None, task_one_hot=False)
    return SimpleNamespace(datamodule=datamodule, is_global_zero=True, world_size=1, current_epoch=1,
                           state=SimpleNamespace(fn=TrainerFn.FITTING), callbacks=[])


def test_callback_logs_eval_metrics_and_skips_nav2d() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = _LoggingModule(MLPActorCritic(39, 4, hidden_dim=16))
    callback = MetaWorldEvaluation(every_n_epochs=2, num_evals=1, adaptation_episodes=1, evaluation_episodes=1,
                                   max_episode_steps=30)
    callback.on_train_epoch_end(_trainer("ML1", "reach-v3"), module)  # epoch index 1 -> 2nd epoch
    assert set(module.logged) == {"eval/success_rate", "eval/return", "eval/success/reach-v3"}
    assert 0.0 <= module.logged["eval/success_rate"] <= 1.0
    assert module.training  # train mode restored

    module.logged = {}
    callback.on_train_epoch_end(_trainer("nav2d"), module)
    assert module.logged == {} and callback._skip_noted
    with pytest.raises(ValueError, match="num_evals"):
        MetaWorldEvaluation(num_evals=0)


@pytest.mark.parametrize(
    ("every_n_epochs", "at_fit_end", "max_epochs", "evaluated_after"),
    [
        (0, True, 5, [5]),  # only the last epoch
        (2, True, 5, [2, 4, 5]),  # the periodic ones and the last
        (5, True, 5, [5]),  # both at the last epoch: once
        (2, False, 5, [2, 4]),  # off: the periodic ones only
        (0, True, -1, []),  # no last epoch to recognise
    ],
)
def test_at_fit_end_evaluates_after_the_last_training_epoch_once(every_n_epochs, at_fit_end, max_epochs, evaluated_after):
    callback = MetaWorldEvaluation(every_n_epochs=every_n_epochs, at_fit_end=at_fit_end)
    evaluated: list[int] = []
    callback._evaluate_and_log = lambda trainer, module: evaluated.append(trainer.current_epoch + 1)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=max_epochs)
    for epoch in range(5):
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, None)
    assert evaluated == evaluated_after


def test_official_protocol_counts_are_the_published_ones_whatever_the_arguments() -> None:
    callback = MetaWorldEvaluation(protocol="official", num_evals=2, adaptation_episodes=1, evaluation_episodes=1,
                                   max_episode_steps=30, envs_per_class=4)
    assert callback.counts("ML10", data_episode_steps=150) == {
        "protocol": "official", "num_evals": None, "adaptation_episodes": 10, "evaluation_episodes": 3,
        "envs_per_class": 1, "max_episode_steps": 500,
    }
    assert callback.counts("MT10", data_episode_steps=150) == {"protocol": "official", "evaluation_episodes": 50, "max_episode_steps": 500}
    custom = MetaWorldEvaluation(num_evals=2, adaptation_episodes=1, evaluation_episodes=1)
    assert custom.counts("ML1", data_episode_steps=150)["max_episode_steps"] == 150
    with pytest.raises(ValueError, match="MetaWorldEvaluation.protocol"):
        MetaWorldEvaluation(protocol="published")


def test_eval_envs_split_goals_across_envs_of_a_class_as_metaworld_does() -> None:
    bench = make_benchmark("ML1", "reach-v3", seed=0)
    goals = list(bench.tasks("test")["reach-v3"])
    envs = make_eval_envs(bench, "test", seed=0, max_episode_steps=10, envs_per_class=5)
    try:
        held = envs.get_attr("tasks")
        assert len(held) == 5
        # Disjoint shares of every goal (order inside a share is the wrapper's shuffle).
        assert sorted(t.data for share in held for t in share) == sorted(t.data for t in goals)
    finally:
        envs.close()


def test_the_terminal_line_names_protocol_counts_and_success() -> None:
    from callbacks.evaluation import _summary_line

    result = {"success_rate": 0.62, "success_per_task": {"reach-v3": 0.62},
              "counts": {"protocol": "official", "num_evals": None, "adaptation_episodes": 10, "evaluation_episodes": 3}}
    line = _summary_line(result, 1_000_000)
    assert line.startswith("Meta-World evaluation (official: adaptation_episodes 10, evaluation_episodes 3)")
    assert "1,000,000 env steps" in line and "success rate 0.620 (reach-v3 0.62)" in line


def test_sampled_eval_actions_are_labelled_and_differ_from_the_mean() -> None:
    counts = MetaWorldEvaluation(protocol="official", eval_actions="sample").counts("ML1", 500)
    assert counts["eval_actions"] == "sample" and counts["protocol"] == "official"
    assert "eval_actions" not in MetaWorldEvaluation(protocol="official").counts("ML1", 500)
    torch.manual_seed(0)
    module = MetaRLModule(MLPActorCritic(39, 4, hidden_dim=16, init_log_std=0.0))
    obs = np.random.default_rng(0).normal(size=(3, 39))
    mean = MetaWorldAgent(module, 3).eval_action(obs)
    sampled = MetaWorldAgent(module, 3, seed=1, sample_eval_actions=True).eval_action(obs)
    again = MetaWorldAgent(module, 3, seed=1, sample_eval_actions=True).eval_action(obs)
    assert np.abs(sampled - mean).mean() > 0.3  # std 1 noise (clipped to the box)
    np.testing.assert_array_equal(sampled, again)  # seeded


def test_train_split_runs_the_protocol_on_the_training_goals_under_its_own_names(monkeypatch) -> None:
    """split: train evaluates ML1's training goals (not the held-out ones) and logs eval_train/..."""
    import metarl_lightning.evaluation as evaluation_module

    built = []
    real = evaluation_module.make_eval_envs
    monkeypatch.setattr(evaluation_module, "make_eval_envs", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = _LoggingModule(MLPActorCritic(39, 4, hidden_dim=16))
    callback = MetaWorldEvaluation(every_n_epochs=2, num_evals=2, adaptation_episodes=1, evaluation_episodes=1,
                                   max_episode_steps=20, split="train")
    callback.on_train_epoch_end(_trainer("ML1", "reach-v3"), module)
    assert set(module.logged) == {"eval_train/success_rate", "eval_train/return", "eval_train/success/reach-v3"}
    assert callback.last_result["counts"]["split"] == "train"
    bench = make_benchmark("ML1", "reach-v3", seed=0)
    current = built[0].envs[0].unwrapped._last_rand_vec
    assert any(np.array_equal(current, v) for v in _rand_vecs(bench.train_tasks["reach-v3"]))
    assert not any(np.array_equal(current, v) for v in _rand_vecs(bench.test_tasks["reach-v3"]))
    assert "split" not in MetaWorldEvaluation(protocol="official").counts("ML1", 500)
    with pytest.raises(ValueError, match="MetaWorldEvaluation.split"):
        MetaWorldEvaluation(split="validation")
    with pytest.raises(ValueError, match="split"):
        evaluate_meta_learning(module, "ML1", "reach-v3", split="val")


def test_adapted_eval_state_is_recorded_in_the_counts_and_checked() -> None:
    counts = MetaWorldEvaluation(protocol="official", eval_state="adapted").counts("ML10", 500)
    assert counts["eval_state"] == "adapted" and counts["num_evals"] is None  # the official counts stay
    assert "eval_state" not in MetaWorldEvaluation(protocol="official").counts("ML10", 500)
    with pytest.raises(ValueError, match="MetaWorldEvaluation.eval_state"):
        MetaWorldEvaluation(eval_state="fresh")
