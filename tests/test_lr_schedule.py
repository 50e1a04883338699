"""The annealed outer learning rate (``model.meta_lr_final``): the schedule, and the module setting
every parameter group's rate from it before each iteration's outer steps."""

import lightning as L
import pytest
import torch

from metarl_lightning.algorithms.lr_schedule import linear_lr_factor
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic, SSMActorCritic
from tests.helpers import quiet_trainer


def test_the_factor_falls_linearly_from_one_to_the_final_fraction_and_then_holds():
    assert linear_lr_factor(0, 4, 0.0) == 1.0
    assert [linear_lr_factor(e, 4, 0.0) for e in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert linear_lr_factor(2, 4, 0.2) == pytest.approx(0.6)  # halfway between 1 and 0.2
    assert linear_lr_factor(3, 5, 1.0) == 1.0  # final fraction 1: constant
    for bad in [(-1, 4, 0.0), (0, 0, 0.0), (0, 4, -0.1), (0, 4, 1.5)]:
        with pytest.raises(ValueError):
            linear_lr_factor(*bad)


def test_the_module_sets_every_group_from_its_own_start_rate(monkeypatch):
    """An S5 policy with its own SSM rate: iterations 0-3 of a 4-epoch run step with 1, 0.75,
    0.5 and 0.25 times each group's start rate (meta_lr for the MLP groups, ssm_lr for the SSM)."""
    seen: list[dict[str, float]] = []
    original = MetaRLModule._outer_step

    def recording(self, support, query, optimizer, may_stop):
        seen.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        return original(self, support, query, optimizer, may_stop)

    monkeypatch.setattr(MetaRLModule, "_outer_step", recording)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    policy = SSMActorCritic(2, 2, hidden_dim=8, state_dim=4)
    module = MetaRLModule(policy, meta_lr=1e-3, ssm_lr=4e-4, ppo_epochs=1, target_kl=None, meta_lr_final=0.0)
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)
    trainer = quiet_trainer(4, [])
    trainer.fit(module, data)
    assert len(seen) == 4 and "ssm" in seen[0] and len(seen[0]) >= 2
    for epoch, rates in enumerate(seen):
        factor = 1 - epoch / 4
        for name, lr in rates.items():
            assert lr == pytest.approx((4e-4 if name == "ssm" else 1e-3) * factor), (epoch, name, lr)
    assert trainer.logged_metrics["train/meta_lr"].item() == pytest.approx(1e-3 * 0.25)


def test_the_rate_is_constant_by_default_and_the_final_rate_is_checked():
    module = MetaRLModule(MLPActorCritic(2, 2), meta_lr=1e-3)
    optimizer = module.configure_optimizers()
    assert module._schedule_lr(optimizer) is None
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}
    # A Trainer built in code with no epoch count: refused before the first iteration, as the CLI does.
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)
    with pytest.raises(ConfigError, match="trainer.max_epochs: model.meta_lr_final"):
        quiet_trainer(-1, [], max_steps=1).fit(MetaRLModule(MLPActorCritic(2, 2), meta_lr=1e-3, meta_lr_final=0.0), data)
    for bad in (-1e-4, 2e-3):
        with pytest.raises(ConfigError, match="model.meta_lr_final"):
            MetaRLModule(MLPActorCritic(2, 2), meta_lr=1e-3, meta_lr_final=bad)
