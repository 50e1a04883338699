"""Observation normalisation: the running moments against numpy on all the data, the transform, the
collector and the evaluation adapter applying it, the module folding statistics in once per
iteration, the checkpoint carrying them, and the CLI refusing a checkpoint of the other kind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl_lightning.algorithms.running_moments import Moments, merge_moments, moments_from_shifted_sums, standardize_, standardizing_scale
from metarl_lightning.checks.checkpoint import check_state_dict
from metarl_lightning.envs.navigation import Navigation2DVectorEnv
from metarl_lightning.errors import ConfigError
from metarl_lightning.evaluation_agent import MetaWorldAgent
from metarl_lightning.module import MetaRLModule
from metarl_lightning.observation_normalizer import ObservationNormalizer
from metarl_lightning.policies import MLPActorCritic
from metarl_lightning.rollouts import RolloutCollector
from tests.helpers import EpochMetrics, quiet_trainer
from tests.run_outputs import cli_args, cli_env


def _moments(x: np.ndarray) -> Moments:
    """The oracle: numpy's mean and population variance over all rows, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return Moments(torch.tensor(float(len(x)), dtype=torch.float64), torch.from_numpy(x.mean(0)), torch.from_numpy(x.var(0)))


def _assert_moments(a: Moments, b: Moments, rtol: float = 1e-9) -> None:
    assert float(a.count) == float(b.count)
    torch.testing.assert_close(a.mean, b.mean, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(a.var, b.var, rtol=rtol, atol=1e-15)


def _data(rows: int, seed: int = 0) -> np.ndarray:
    """Coordinates far from zero with a small spread (as Meta-World's, exaggerated): where a plain
    sum of squares would lose the variance to cancellation."""
    rng = np.random.default_rng(seed)
    return rng.normal(loc=[1e3, -5.0, 0.0], scale=[1e-2, 2.0, 1e-3], size=(rows, 3))


def test_merging_batches_gives_the_moments_of_all_the_data() -> None:
    x = _data(1000)
    a, b = _moments(x[:7]), _moments(x[7:])
    _assert_moments(merge_moments(a, b), _moments(x))
    empty = Moments(torch.zeros((), dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    _assert_moments(merge_moments(empty, a), a)
    _assert_moments(merge_moments(a, empty), a)


def test_shifted_sums_keep_the_variance_of_far_off_data() -> None:
    x = torch.from_numpy(_data(500))
    shift = x[0].clone()  # near the data, as the running mean is
    got = moments_from_shifted_sums(torch.tensor(500.0, dtype=torch.float64), shift, (x - shift).sum(0), (x - shift).square().sum(0))
    _assert_moments(got, _moments(x.numpy()))


def standardized(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, clip: float = 10.0, eps: float = 1e-8) -> torch.Tensor:
    """The definition, written out: ``clamp((x - mean) / sqrt(var + eps), -clip, clip)``."""
    return ((x - mean) / torch.sqrt(var + eps)).clamp(-clip, clip)


def test_standardize_centres_scales_and_clips_in_place() -> None:
    x = torch.tensor([[1.0, 100.0, 0.5], [3.0, -100.0, 0.5]])
    mean, var = torch.tensor([2.0, 0.0, 0.5]), torch.tensor([4.0, 1.0, 0.0])
    expected = standardized(x, mean, var)
    out = standardize_(x, mean, standardizing_scale(var), clip=10.0)
    assert out is x
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, torch.tensor([[-0.5, 10.0, 0.0], [0.5, -10.0, 0.0]]))


def test_the_normalizer_accumulates_uneven_batches_and_leaves_trailing_columns_alone() -> None:
    x = _data(900)
    extra = np.random.default_rng(1).normal(size=(900, 2))  # e.g. context inputs: never touched
    normalizer = ObservationNormalizer(dim=5)
    normalizer.set_columns(3)
    inputs = np.concatenate([x, extra], axis=1).astype(np.float32)
    assert normalizer.normalize(inputs) is inputs, "the identity until statistics exist"
    for start, stop in [(0, 1), (1, 250), (250, 900)]:
        for row in range(start, stop, 50):  # several records per batch, then one commit
            normalizer.record(np.concatenate([x, extra], axis=1)[row : min(row + 50, stop)])
        normalizer.commit()
    _assert_moments(Moments(normalizer.count, normalizer.mean[:3], normalizer.var[:3]), _moments(x))
    assert float(normalizer.mean[3:].abs().sum()) == 0 and float((normalizer.var[3:] - 1).abs().sum()) == 0
    out = normalizer.normalize(np.concatenate([x, extra], axis=1).astype(np.float32))
    np.testing.assert_array_equal(out[:, 3:], extra.astype(np.float32))
    # float32 inputs lose the 1e-2 spread of a coordinate at 1e3 to rounding, and the 1e-3 spread
    # of the third meets the eps of 1e-8 in the variance: the second is standardised exactly.
    np.testing.assert_allclose([out[:, 1].mean(), out[:, 1].std()], [0.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(out[:, 2].std(), np.sqrt(1e-6 / (1e-6 + 1e-8)), rtol=1e-2)


def test_columns_of_another_layout_are_refused() -> None:
    normalizer = ObservationNormalizer(dim=5)
    normalizer.set_columns(3)
    normalizer.set_columns(3)
    with pytest.raises(ValueError, match="another benchmark"):
        normalizer.set_columns(2)
    with pytest.raises(ValueError, match="columns must be in"):
        ObservationNormalizer(dim=5).set_columns(6)


K, E, HORIZON, STEPS = 3, 4, 20, 50


def _blind_policy() -> MLPActorCritic:
    """An MLP whose action mean ignores the observation (zero output weights): its trajectories are
    the same whatever the inputs are standardised to, so rollouts with and without normalisation
    can be compared step by step."""
    torch.manual_seed(0)
    policy = MLPActorCritic(2, 2, hidden_dim=8)
    with torch.no_grad():
        policy.actor[-1].weight.zero_()
        policy.actor[-1].bias.fill_(0.3)
    return policy


def _rollout(policy: MLPActorCritic, normalizer: ObservationNormalizer | None, record: bool):
    env = Navigation2DVectorEnv(K, E, HORIZON)
    env.set_tasks(env.sample_tasks(K, np.random.default_rng(0)))
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1))
    return RolloutCollector(env).collect(policy, None, STEPS, noise, obs_normalizer=normalizer, record_observations=record)


def test_the_collector_stores_standardised_inputs_and_records_the_raw_ones() -> None:
    policy = _blind_policy()
    raw = _rollout(policy, None, record=False).observations  # (K, E, T, 2)
    earlier = _data(40, seed=2)[:, 1:]  # statistics from some earlier iteration
    normalizer = ObservationNormalizer(dim=2)
    normalizer.set_columns(2)
    normalizer.record(earlier)
    normalizer.commit()
    before = Moments(normalizer.count.clone(), normalizer.mean.clone(), normalizer.var.clone())
    rollout = _rollout(policy, normalizer, record=True)
    expected = standardized(raw, before.mean.float(), before.var.float())
    torch.testing.assert_close(rollout.observations, expected, rtol=0, atol=1e-6)
    # Exactly the K x E x T inputs the policy acted on went into the statistics.
    assert normalizer.pending_count == K * E * STEPS
    normalizer.commit()
    flat = raw.reshape(-1, 2).double().numpy()
    _assert_moments(Moments(normalizer.count, normalizer.mean, normalizer.var), _moments(np.concatenate([earlier, flat])))
    # Evaluation rollouts read the statistics and record nothing.
    _rollout(policy, normalizer, record=False)
    assert normalizer.pending_count == 0


def test_the_evaluation_agent_feeds_the_policy_what_training_fed_it() -> None:
    module = MetaRLModule(MLPActorCritic(39, 4, hidden_dim=8), normalize_observations=True)
    module.obs_normalizer.set_columns(39)
    obs = np.random.default_rng(0).normal(loc=0.5, scale=0.1, size=(64, 39))
    module.obs_normalizer.record(obs)
    module.obs_normalizer.commit()
    agent = MetaWorldAgent(module, num_envs=2)
    given = agent._obs(obs[:2])
    torch.testing.assert_close(given, torch.from_numpy(module.obs_normalizer.normalize(obs[:2].astype(np.float32))))
    assert given.abs().max() < 5 and not torch.allclose(given, torch.as_tensor(obs[:2], dtype=torch.float32))


def test_the_module_folds_in_each_iteration_and_the_checkpoint_keeps_the_statistics(tmp_path: Path) -> None:
    from metarl_lightning.data import MetaTaskDataModule

    torch.set_num_threads(1)
    data = MetaTaskDataModule("nav2d", meta_batch_size=4, rollouts_per_task=4, max_episode_steps=25, seed=0)
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8), normalize_observations=True)
    trainer = quiet_trainer(2, [EpochMetrics()])
    trainer.fit(module, data)
    per_iteration = 2 * 4 * 4 * 25  # (support + query) x tasks x envs x steps
    assert float(module.obs_normalizer.count) == 2 * per_iteration and module.obs_normalizer.pending_count == 0
    assert int(module.obs_normalizer.columns) == 2
    trainer.save_checkpoint(tmp_path / "n.ckpt")
    saved = torch.load(tmp_path / "n.ckpt", weights_only=False)["state_dict"]
    restored = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8), normalize_observations=True)
    restored.load_state_dict(saved)
    for key in ("count", "mean", "var", "columns"):
        assert torch.equal(getattr(restored.obs_normalizer, key), getattr(module.obs_normalizer, key)), key
    inputs = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_array_equal(restored.obs_normalizer.normalize(inputs), module.obs_normalizer.normalize(inputs))
    # A module without normalisation cannot take this checkpoint, and says which switch to set.
    plain = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8))
    with pytest.raises(ConfigError, match="trained with observation normalisation; set --model.normalize_observations true"):
        check_state_dict("n.ckpt", saved, plain.state_dict())
    with pytest.raises(ConfigError, match="trained without observation normalisation; set --model.normalize_observations false"):
        check_state_dict("p.ckpt", plain.state_dict(), module.state_dict())


def test_validate_of_a_normalised_checkpoint_without_the_switch_is_one_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "2", "--model.normalize_observations", "true"),
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert float(torch.load(ckpt, weights_only=False)["state_dict"]["obs_normalizer.count"]) > 0
    refused = subprocess.run(
        cli_args("validate", tmp_path, uri, "--ckpt_path", str(ckpt)), cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    lines = refused.stderr.splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "model.normalize_observations" in lines[0], refused.stderr[-3000:]
    ok = subprocess.run(
        cli_args("validate", tmp_path, uri, "--ckpt_path", str(ckpt), "--model.normalize_observations", "true"),
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
