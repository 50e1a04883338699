"""The decaying std ceiling (``model.std_ceiling``): the schedule, the projection, and the module
applying it before every meta-iteration's rollouts."""

import math

import lightning as L
import pytest
import torch

from metarl_lightning.algorithms.std_schedule import project_log_std, std_ceiling
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic, SSMActorCritic
from tests.helpers import quiet_trainer


def test_the_ceiling_falls_geometrically_from_one_and_then_holds():
    assert std_ceiling(0, 0.3, 10) == 1.0
    assert std_ceiling(5, 0.3, 10) == pytest.approx(math.sqrt(0.3))
    assert std_ceiling(10, 0.3, 10) == pytest.approx(0.3)
    assert std_ceiling(25, 0.3, 10) == pytest.approx(0.3)
    values = [std_ceiling(e, 0.2, 7) for e in range(12)]
    assert all(a > b for a, b in zip(values[:7], values[1:8])) and len(set(values[7:])) == 1
    assert std_ceiling(3, 1.0, 4) == 1.0  # final std 1: no ceiling below the start
    for bad in [(-1, 0.3, 10), (0, 0.0, 10), (0, 1.5, 10), (0, 0.3, 0)]:
        with pytest.raises(ValueError):
            std_ceiling(*bad)


def test_the_projection_clamps_each_dimension_above_the_ceiling_only():
    log_std = torch.tensor([0.5, -0.2, -2.0])
    project_log_std(log_std, 0.5)
    assert torch.equal(log_std, torch.tensor([math.log(0.5), math.log(0.5), -2.0]))


def test_the_module_projects_the_std_before_every_iteration_and_logs_the_ceiling(monkeypatch):
    """A std that starts at e^0.5 = 1.65 is under 1, 0.71, 0.5, 0.5 as iterations 0-3 collect."""
    seen: list[torch.Tensor] = []
    original = MetaRLModule.adapt_and_collect

    def recording(self, *args, **kwargs):
        seen.append(self.policy.log_std.detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MetaRLModule, "adapt_and_collect", recording)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8, init_log_std=0.5), ppo_epochs=2, std_ceiling=0.5, std_ceiling_epochs=2)
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)
    trainer = quiet_trainer(4, [])
    trainer.fit(module, data)
    assert len(seen) == 4
    for epoch, log_std in enumerate(seen):
        ceiling = math.log(std_ceiling(epoch, 0.5, 2))
        # At or below the ceiling; the parameter starts above every ceiling and an update moves it
        # by at most ~meta_lr per Adam step (2 here), so it sits at the ceiling or just under it.
        assert (log_std <= ceiling + 1e-6).all(), (epoch, log_std, ceiling)
        assert (log_std >= ceiling - 2 * 2 * 3e-4).all(), (epoch, log_std, ceiling)
    assert torch.equal(seen[0], torch.zeros(2))  # iteration 0: projected from 0.5 to log(1) exactly
    assert trainer.logged_metrics["train/std_ceiling"].item() == pytest.approx(0.5)
    # Off by default: the std is the policy's own.
    assert MetaRLModule(MLPActorCritic(2, 2))._project_std() is None
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="model.std_ceiling"):
            MetaRLModule(MLPActorCritic(2, 2), std_ceiling=bad)
    with pytest.raises(ConfigError, match="model.std_ceiling_epochs"):
        MetaRLModule(MLPActorCritic(2, 2), std_ceiling=0.5, std_ceiling_epochs=0)
    # A std head moves the std above the projected parameter: the ceiling could not hold.
    with pytest.raises(ConfigError, match="model.std_ceiling.*state_dependent_std"):
        MetaRLModule(SSMActorCritic(2, 2, hidden_dim=8, state_dim=4, state_dependent_std=True), std_ceiling=0.5)
    MetaRLModule(SSMActorCritic(2, 2, hidden_dim=8, state_dim=4, state_dependent_std=True))
    MetaRLModule(SSMActorCritic(2, 2, hidden_dim=8, state_dim=4), std_ceiling=0.5)


def test_a_ceiling_on_the_adapted_policy_bounds_theta_prime_only(monkeypatch):
    """``std_ceiling_on: adapted``: theta's std is left alone (the support explores with it);
    theta_k''s log-std after the inner step is clamped to this iteration's ceiling."""
    seen: list[tuple[int, torch.Tensor]] = []
    original = MetaRLModule._adapt

    def recording(self, *args, **kwargs):
        adapted = original(self, *args, **kwargs)
        seen.append((self.current_epoch, adapted["log_std"].detach().clone()))
        return adapted

    monkeypatch.setattr(MetaRLModule, "_adapt", recording)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MetaRLModule(
        MLPActorCritic(2, 2, hidden_dim=8, init_log_std=0.0), ppo_epochs=2, std_ceiling=0.5, std_ceiling_epochs=1, std_ceiling_on="adapted"
    )
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)
    trainer = quiet_trainer(2, [])
    trainer.fit(module, data)
    assert {epoch for epoch, _ in seen} == {0, 1}
    for epoch, log_std in seen:
        assert log_std.shape[0] == 2  # one row per agent
        assert (log_std <= math.log(std_ceiling(epoch, 0.5, 1)) + 1e-6).all(), (epoch, log_std)
    # Iteration 1: theta's log-std (~0) is above log 0.5, so every agent's adapted one sits at it.
    torch.testing.assert_close(seen[-1][1], torch.full_like(seen[-1][1], math.log(0.5)))
    # theta itself was not projected: two updates of ~meta_lr per Adam step from 0.
    assert (module.policy.log_std.detach().abs() < 0.01).all(), module.policy.log_std
    assert trainer.logged_metrics["train/std_ceiling"].item() == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="model.std_ceiling_on"):
        MetaRLModule(MLPActorCritic(2, 2), std_ceiling_on="query")
