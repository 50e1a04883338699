"""Meta-World's official evaluation protocol, run with our policy and our MAML inner update.

Published Meta-World numbers come from ``metaworld.evaluation.evaluation`` (MT) and
``metaworld.evaluation.metalearning_evaluation`` (ML). They are called here *unchanged*; this module
only supplies what they expect:

* :func:`make_eval_envs`: the vector env, built from our cached :class:`Benchmark` with metaworld's own
  per-env wrapper stack (``metaworld._init_each_env``: TimeLimit, AutoTerminateOnSuccess,
  RecordEpisodeStatistics, task-select wrapper), one env per task class, synchronous. The simulators
  are our bit-identical fast classes (``envs.fast.env_class``) when verified, else the stock ones; the
  fast classes report the stock ``task_name``, which metaworld uses to name tasks.
* :class:`~metarl_lightning.evaluation_agent.MetaWorldAgent`: the ``MetaLearningAgent`` protocol over a :class:`MetaRLModule`: every env
  (= task) has its own parameter set; adaptation data is turned into a ``[K, 1, T]`` :class:`Rollout`
  and adapted with the module's own inner update (``MetaRLModule._adapt``, first order).
* In-context agents (``data.context_inputs``, ``data.reset_state_on: trial``): the protocol gives
  ``eval_action`` no reward, so the context inputs come from an observation wrapper on the eval envs
  (:class:`~metarl_lightning.envs.context.ContextObservation`), and the agent keeps its recurrent
  state over all episodes of a task, adaptation and evaluation alike (one trial per task).

Differences from the upstream vector envs, on purpose: ML evaluation uses one env per test class
(upstream ``make_vec`` builds ``meta_batch_size`` envs, several per class, which only changes how many
goals run in parallel), and ``num_goals``/``max_episode_steps`` can shrink a run for quick checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import gymnasium as gym
import metaworld
import numpy as np
import torch
from metaworld.evaluation import evaluation, metalearning_evaluation

from metarl_lightning.envs.benchmarks import Benchmark, Split, make_benchmark
from metarl_lightning.envs.context import ContextObservation
from metarl_lightning.envs.fast import env_class
from metarl_lightning.evaluation_agent import MetaWorldAgent


def make_eval_envs(
    benchmark: Benchmark,
    split: Split = "test",
    seed: int = 0,
    max_episode_steps: int | None = None,
    num_goals: int | None = None,
    fast: bool = True,
    envs_per_class: int = 1,
    context_reward_scale: float | None = None,
    context_action_scale: float = 1.0,
) -> gym.vector.VectorEnv:
    """The vector env metaworld's evaluation functions expect: ``envs_per_class`` envs per class.

    ML benchmarks get metaworld's ML-test settings (pseudo-random goal order, advanced only by
    ``sample_tasks``; goal hidden by the tasks themselves); MT benchmarks its MT settings (a random
    goal at every reset, goal visible).

    Args:
        benchmark: a built benchmark (:func:`make_benchmark`).
        split: ``"test"`` (held-out classes/goals for ML; the training goals for MT) or ``"train"``.
        seed: seeds the simulators and the goal order (``env.seed``, as metaworld does).
        max_episode_steps: time limit; ``None`` keeps Meta-World's 500.
        num_goals: use only the first ``num_goals`` goals of each class (quick runs).
        fast: use the fast simulator classes when verified.
        envs_per_class: envs per class; env ``i`` of a class holds goals ``i, i + n, i + 2n, ...``
            (metaworld's own split, ``tasks[i::n]``), so one ``sample_tasks`` runs ``n`` distinct goals
            of every class at once. More envs per class batch more work per policy call.
        context_reward_scale: append the context inputs (previous action, reward times this scale,
            done) to the observations (:class:`ContextObservation`); ``None``: bare observations.
        context_action_scale: multiplies the previous-action inputs (``data.context_action_scale``).
    """
    if envs_per_class < 1:
        raise ValueError(f"envs_per_class: must be >= 1, got {envs_per_class}")
    tasks_by_class = benchmark.tasks(split)
    meta_learning = benchmark.is_meta_learning
    factories = []
    for name in benchmark.classes(split):
        tasks = list(tasks_by_class[name])[:num_goals] if num_goals else list(tasks_by_class[name])
        if len(tasks) < envs_per_class:
            raise ValueError(f"envs_per_class: {envs_per_class} exceeds the {len(tasks)} goals of {name}")
        factories.extend(
            partial(
                # Private, but it *is* the wrapper stack of make_mt_envs/make_ml_envs; reusing it keeps
                # infos["final_info"]["episode"] and the toggles the protocol calls identical.
                metaworld._init_each_env,
                env_cls=env_class(name, fast),
                tasks=tasks[i::envs_per_class],
                seed=seed,
                max_episode_steps=max_episode_steps,
                terminate_on_success=meta_learning,
                task_select="pseudorandom" if meta_learning else "random",
                reward_function_version=benchmark.reward_function_version,
            )
            for i in range(envs_per_class)
        )
    # SAME_STEP autoreset: the protocol reads infos["final_info"] on the step an episode ends.
    envs = gym.vector.SyncVectorEnv(factories, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    if context_reward_scale is None:
        return envs
    return ContextObservation(envs, context_reward_scale, action_scale=context_action_scale)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Evaluate on one torch thread: the policy calls are tiny (one env per class) and alternate
    with in-process env steps, so a second thread only adds synchronisation, and beside another
    busy process it stalls every small matmul (an ML1 evaluation ran ~7x slower that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _summary(success_rate: float, mean_return: float, per_task: dict[str, float]) -> dict[str, Any]:
    return {
        "success_rate": float(success_rate),
        "return": float(mean_return),
        "success_per_task": {name: float(v) for name, v in sorted(per_task.items())},
    }


def run_meta_learning(
    agent: Any,
    envs: gym.vector.VectorEnv,
    num_evals: int,
    adaptation_episodes: int,
    evaluation_episodes: int,
    adaptation_steps: int = 1,
) -> dict[str, Any]:
    """``metalearning_evaluation`` on any protocol agent (a ``MetaLearningAgent``).

    Returns:
        ``{"success_rate", "return", "success_per_task": {class: rate}}`` (means over ``num_evals``).
    """
    result = metalearning_evaluation(agent, envs, num_evals, adaptation_steps, adaptation_episodes, evaluation_episodes)
    return _summary(*result)


def run_multi_task(agent: Any, envs: gym.vector.VectorEnv, num_episodes: int) -> dict[str, Any]:
    """``evaluation`` (MT protocol) on any protocol agent; same dict as :func:`run_meta_learning`."""
    success_rate, mean_return, per_task, _ = evaluation(agent, envs, num_episodes)
    return _summary(success_rate, mean_return, per_task)


def evaluate_meta_learning(
    module: Any,
    benchmark_name: str,
    env_name: str | None = None,
    seed: int = 0,
    num_evals: int | None = 10,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
    max_episode_steps: int | None = None,
    adaptation_steps: int = 1,
    fast: bool = True,
    cache_dir: str | None = None,
    envs_per_class: int = 1,
    sample_eval_actions: bool = False,
    context_reward_scale: float | None = None,
    trial_memory: bool = False,
    context_action_scale: float = 1.0,
    eval_state: str = "carry",
    split: Split = "test",
) -> dict[str, Any]:
    """Official ML protocol: adapt to ``num_evals`` goals per class of ``split``, then evaluate.

    With ``envs_per_class`` n, every round adapts to n goals per class at once and ``num_evals``
    counts rounds (n x num_evals goals per class). Beware: metaworld's ``evaluation`` keeps the
    first ``evaluation_episodes`` episodes *per class* to finish, and with terminate-on-success the
    successful ones finish first, so n > 1 overstates the success rate (docs/results.md); the
    default (and ``protocol: official`` of the callback) is n = 1, every goal counted.

    Args:
        module: a :class:`MetaRLModule`.
        benchmark_name: ``ML1``, ``ML10`` or ``ML45``.
        env_name: the environment of ML1.
        seed: benchmark (goal generation) and simulator seed: the training seed gives the same split.
        num_evals: rounds of goals per test class (metaworld's default 10; fewer for quick runs);
            ``None``: every test goal once (the published protocol: 50 goals per class).
        adaptation_episodes: episodes per env collected before the inner update.
        evaluation_episodes: deterministic episodes per env after adaptation.
        max_episode_steps: episode length (``None``: 500).
        adaptation_steps: collect-then-adapt rounds (metaworld: 1).
        fast: fast simulator classes when verified.
        cache_dir: benchmark cache folder (``None``: default).
        envs_per_class: envs per test class (see above).
        sample_eval_actions: score the adapted policy's sampled actions instead of its mean (the
            published protocol and the default use the mean).
        context_reward_scale: give the agent the context inputs it was trained with (previous
            action, reward times this scale, done; ``data.context_inputs``); ``None``: none.
        trial_memory: keep the recurrent state over all episodes of a task (``data.reset_state_on:
            trial``).
        context_action_scale: multiplies the previous-action inputs (``data.context_action_scale``).
        eval_state: with ``trial_memory``, where each evaluation episode starts: ``carry`` (where the
            previous episode ended) or ``adapted`` (the state the adaptation episodes left).
        split: ``"test"`` (the held-out classes and goals: meta-test success, what is published
            first) or ``"train"`` (the training classes and goals under the same protocol:
            meta-train success, the paper's other column; for telling a generalisation gap from
            a measurement gap).

    Returns:
        ``{"success_rate", "return", "success_per_task": {class: rate}}``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
    bench = make_benchmark(benchmark_name, env_name, seed, cache_dir=cache_dir)
    if not bench.is_meta_learning:
        raise ValueError(f"benchmark: {benchmark_name} is not a meta-learning benchmark; use evaluate_multi_task")
    # All goals: the pseudo-random task wrapper shuffles them and walks num_evals distinct ones.
    envs = make_eval_envs(
        bench, split, seed, max_episode_steps, fast=fast, envs_per_class=envs_per_class,
        context_reward_scale=context_reward_scale, context_action_scale=context_action_scale,
    )
    if num_evals is None:
        num_evals = min(len(goals) for goals in bench.tasks(split).values()) // envs_per_class
    try:
        agent = MetaWorldAgent(
            module, envs.num_envs, seed=seed, sample_eval_actions=sample_eval_actions,
            trial_memory=trial_memory, eval_state=eval_state,
        )
        with torch.no_grad(), _one_torch_thread():
            return run_meta_learning(agent, envs, num_evals, adaptation_episodes, evaluation_episodes, adaptation_steps)
    finally:
        envs.close()


def evaluate_multi_task(
    module: Any,
    benchmark_name: str,
    env_name: str | None = None,
    seed: int = 0,
    num_episodes: int = 50,
    max_episode_steps: int | None = None,
    task_one_hot: bool = False,
    fast: bool = True,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Official MT protocol: ``num_episodes`` deterministic episodes per class with theta (no adaptation).

    Args:
        module: a :class:`MetaRLModule`.
        benchmark_name: ``MT1``, ``MT10`` or ``MT50``.
        env_name: the environment of MT1.
        seed: benchmark and simulator seed.
        num_episodes: episodes per class (metaworld's default 50).
        max_episode_steps: episode length (``None``: 500).
        task_one_hot: append the class one-hot over ``benchmark.all_classes``, as training did.
        fast: fast simulator classes when verified.
        cache_dir: benchmark cache folder.

    Returns:
        Same dict as :func:`evaluate_meta_learning`.
    """
    bench = make_benchmark(benchmark_name, env_name, seed, cache_dir=cache_dir)
    envs = make_eval_envs(bench, "test", seed, max_episode_steps, fast=fast)
    suffix = None
    if task_one_hot:
        index = {name: i for i, name in enumerate(bench.all_classes)}
        suffix = np.zeros((envs.num_envs, len(index)), dtype=np.float32)
        suffix[np.arange(envs.num_envs), [index[c] for c in bench.classes("test")]] = 1.0
    try:
        agent = MetaWorldAgent(module, envs.num_envs, observation_suffix=suffix, seed=seed)
        with torch.no_grad(), _one_torch_thread():
            return run_multi_task(agent, envs, num_episodes)
    finally:
        envs.close()
