"""Data-module defaults that are pure functions of the config."""

import numpy as np
import pytest

from metarl_lightning.data import DEFAULT_MAX_ENVS, NAV2D, MetaTaskDataModule, default_envs_per_task


@pytest.mark.parametrize(
    ("benchmark", "meta_batch", "rollouts", "expected"),
    [
        (NAV2D, 20, 10, 10),  # numpy envs cost nothing: all rollouts in parallel
        ("MT10", 10, 10, 10),  # 100 envs
        ("ML10", 20, 10, 5),  # 100 envs, 2 episodes each
        ("ML45", 45, 10, 2),  # 90 envs; 5 per task would be 225
        ("MT50", 50, 10, 2),
        ("ML1", 200, 10, 1),  # never fewer than one env per task
        ("ML1", 20, 7, 1),  # 7 is prime and 20 x 7 > 100
    ],
)
def test_default_envs_per_task_divides_and_bounds_the_env_count(benchmark, meta_batch, rollouts, expected):
    envs = default_envs_per_task(benchmark, meta_batch, rollouts)
    assert envs == expected
    assert rollouts % envs == 0
    if benchmark != NAV2D and envs > 1:
        assert meta_batch * envs <= DEFAULT_MAX_ENVS


def test_a_fit_builds_the_evaluation_envs_when_the_first_evaluation_needs_them():
    data = MetaTaskDataModule("nav2d", meta_batch_size=2, rollouts_per_task=2, max_episode_steps=5)
    data.setup("fit")
    assert "train" in data._envs and "test" not in data._envs, "test envs built before the first step"
    collector = data.eval_collector
    assert "test" in data._envs and data.eval_collector is collector
    data.teardown("fit")
    data.setup("validate")
    assert "test" in data._envs and "train" not in data._envs


def test_prestart_starts_the_train_envs_that_setup_then_uses():
    """A prestarted data module steps the same envs, with the same observations, as a plain one."""
    observations = []
    for prestart in (True, False):
        data = MetaTaskDataModule("ML1", env_name="reach-v3", meta_batch_size=2, rollouts_per_task=2, max_episode_steps=5, num_env_workers=2)
        if prestart:
            data.prestart()
            env = data.train_collector.env
            assert env._building, "prestart waited for the workers"
        data.setup("fit")
        if prestart:
            assert data.train_collector.env is env, "setup built a second env set"
        assert "test" not in data._envs
        env = data.train_collector.env
        env.set_tasks(data.global_tasks("train", 0))
        observations.append(env.reset())
        data.teardown("fit")
    np.testing.assert_array_equal(observations[0], observations[1])
