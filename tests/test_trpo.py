"""The TRPO step against closed forms: conjugate gradient vs a direct solve, the natural-gradient
step of a linear loss in a quadratic trust region, the Gaussian KL vs torch.distributions."""

from __future__ import annotations

import torch

from metarl_lightning.algorithms.trpo import conjugate_gradient, gaussian_kl, trpo_step


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_solves_a_positive_definite_system():
    a = _spd(12)
    b = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=40)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    # Few iterations are an approximation, not the answer.
    assert (conjugate_gradient(lambda v: a @ v, b, iterations=2) - torch.linalg.solve(a, b)).abs().max() > 1e-3


def test_step_of_a_linear_loss_in_a_quadratic_trust_region_is_the_closed_form():
    """loss = g.x, KL = 0.5 (x - x0)^T A (x - x0): the step is x0 - sqrt(2 d / g^T A^-1 g) A^-1 g,
    it lands on the trust region's edge and is accepted without backtracking."""
    a, n, max_kl = _spd(6, seed=2), 6, 0.01
    g = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    result = trpo_step([x], lambda: g @ x, lambda: 0.5 * (x - x0) @ a @ (x - x0), max_kl=max_kl, cg_iterations=20, damping=0.0)
    natural = torch.linalg.solve(a, g)
    expected = x0 - torch.sqrt(2 * max_kl / (g @ natural)) * natural
    torch.testing.assert_close(x.detach(), expected, rtol=1e-7, atol=1e-9)
    assert result.accepted == 1.0 and result.backtracks == 0
    torch.testing.assert_close(result.kl, torch.tensor(max_kl, dtype=torch.float64), rtol=1e-6, atol=0)
    assert result.loss_after < result.loss_before


def test_a_step_that_breaks_the_trust_region_is_backtracked_or_rejected():
    """A KL with the same curvature at x0 but a steep quartic term: the full step overshoots the
    budget; the line search shrinks it until it fits, or (one try allowed) leaves x as it was."""
    a, n, max_kl = _spd(4, seed=5), 4, 0.01
    g = torch.randn(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x0 = torch.zeros(n, dtype=torch.float64)

    def kl_of(x):
        d = x - x0
        return 0.5 * d @ a @ d + 1e4 * (d @ d) ** 2

    x = x0.clone().requires_grad_(True)
    shrunk = trpo_step([x], lambda: g @ x, lambda: kl_of(x), max_kl=max_kl, damping=0.0)
    assert shrunk.accepted == 1.0 and shrunk.backtracks > 0 and float(kl_of(x.detach())) <= max_kl
    y = x0.clone().requires_grad_(True)
    rejected = trpo_step([y], lambda: g @ y, lambda: kl_of(y), max_kl=max_kl, damping=0.0, max_backtracks=1)
    assert rejected.accepted == 0.0 and torch.equal(y.detach(), x0)


def test_gaussian_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(7)
    mp, mq = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    sp, sq = 0.3 * torch.randn(5, 3, generator=gen), 0.3 * torch.randn(3, generator=gen)
    p = torch.distributions.Normal(mp, sp.exp())
    q = torch.distributions.Normal(mq, sq.exp())
    torch.testing.assert_close(gaussian_kl(mp, sp, mq, sq), torch.distributions.kl_divergence(p, q).sum(-1))
    assert torch.all(gaussian_kl(mp, sp, mp, sp).abs() < 1e-6)


def _collected(policy, **module_kwargs):
    from metarl_lightning.data import MetaTaskDataModule
    from metarl_lightning.module import MetaRLModule

    import lightning as L

    L.seed_everything(0, verbose=False)
    module = MetaRLModule(policy, inner_lr=0.1, outer_optimizer="trpo", **module_kwargs)
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=4, rollouts_per_task=4, max_episode_steps=10)
    data.setup("fit")
    support, query = module.adapt_and_collect(data.meta_batch("train", 0), data.train_collector, data.rollout_steps)
    return module, support, query


def _acting_distribution(module, support, query, params):
    """Mean and std of theta'_k(params) on the query observations, through torch.distributions."""
    from metarl_lightning.algorithms.maml import stack_for_agents
    from metarl_lightning.policies.functional import batched_policy_forward

    with torch.enable_grad():
        adapted = {k: v.detach() for k, v in module._adapt(stack_for_agents(params, 4), support, True).items()}
    with torch.no_grad():
        out = batched_policy_forward(module.policy, adapted, query.observations, query.initial_state, query.resets)
    return torch.distributions.Normal(out.mean, out.log_std.exp().expand_as(out.mean))


def test_maml_trpo_step_stays_in_the_trust_region_and_improves_the_surrogate():
    """Second-order MAML through the S5 scan: after the step, the adapted policies' mean KL from
    the acting ones is within max_kl (and not 0: it moved), and the surrogate computed from the
    log-probs the collector stored improved on its value at the acting policy (0: advantages are
    normalised per agent)."""
    from metarl_lightning.policies import SSMActorCritic
    from metarl_lightning.trpo_outer import maml_trpo_update

    module, support, query = _collected(SSMActorCritic(2, 2, hidden_dim=8, state_dim=4, num_layers=1))
    before = _acting_distribution(module, support, query, module._meta_parameters())
    torch.testing.assert_close(before.log_prob(query.actions).sum(-1), query.log_probs, atol=1e-4, rtol=1e-4)
    step = maml_trpo_update(module.policy, module._meta_parameters(), [], module._adapt, support, query, max_kl=0.01, first_order=False)
    after = _acting_distribution(module, support, query, module._meta_parameters())
    kl = torch.distributions.kl_divergence(before, after).sum(-1).mean()
    assert step.accepted == 1.0 and 1e-4 < float(kl) <= 0.01 + 1e-6, (step, float(kl))
    ratio = (after.log_prob(query.actions).sum(-1) - query.log_probs).exp()
    surrogate = -(ratio * query.normalized_advantages()).mean()
    assert float(surrogate) < -1e-4
    torch.testing.assert_close(surrogate, step.loss_after, atol=1e-5, rtol=1e-4)


def test_trpo_fit_takes_accepted_steps_and_trains_the_critic():
    """Two iterations through the trainer (MLP, first order): accepted steps within the KL, the
    critic's value steps reported as PPO epochs; TRPO refuses minibatches."""
    from metarl_lightning.data import MetaTaskDataModule
    from metarl_lightning.errors import ConfigError
    from metarl_lightning.module import MetaRLModule
    from metarl_lightning.policies import MLPActorCritic
    from tests.helpers import EpochMetrics, quiet_trainer

    import lightning as L
    import pytest

    L.seed_everything(0, verbose=False)
    policy = MLPActorCritic(2, 2, hidden_dim=8)
    critic = {k: v.detach().clone() for k, v in policy.named_parameters() if k.startswith("critic")}
    module = MetaRLModule(policy, outer_optimizer="trpo", max_kl=0.02, first_order=True, ppo_epochs=3)
    recorder = EpochMetrics()
    quiet_trainer(2, [recorder]).fit(module, MetaTaskDataModule("nav2d", seed=0, meta_batch_size=4, rollouts_per_task=2, max_episode_steps=10))
    for metrics in recorder.history:
        assert metrics["train/trpo_accepted"] == 1.0 and 0 < metrics["train/trpo_kl"] <= 0.02
        assert metrics["train/trpo_loss_after"] < metrics["train/trpo_loss_before"]
        assert metrics["train/ppo_epochs_run"] == 3.0
    assert any(not torch.equal(v, dict(policy.named_parameters())[k]) for k, v in critic.items())
    with pytest.raises(ConfigError, match="model.outer_optimizer"):
        MetaRLModule(MLPActorCritic(2, 2), outer_optimizer="trpo", outer_env_minibatches=2)
    with pytest.raises(ConfigError, match="model.max_kl"):
        MetaRLModule(MLPActorCritic(2, 2), max_kl=0.0)


def test_trpo_without_a_critic_checkpoints_every_epoch(tmp_path):
    """A TRPO run with no critic (the Meta-World configs: linear baseline, value_coef 0) takes no Adam
    step; the TRPO step must still count as the iteration's optimiser step, or global_step stays 0
    and RunCheckpoint skips every epoch (found on a 10M-step ML10 run that had no last.ckpt to resume)."""
    import os

    import lightning as L

    from callbacks.checkpointing import RunCheckpoint
    from metarl_lightning.data import MetaTaskDataModule
    from metarl_lightning.module import MetaRLModule
    from metarl_lightning.policies import MLPActorCritic
    from tests.helpers import quiet_trainer

    seen: list[tuple[int, int, int | None]] = []
    last = tmp_path / "checkpoints" / "last.ckpt"

    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            saved = torch.load(last, weights_only=False)["epoch"] if os.path.exists(last) else None
            seen.append((trainer.current_epoch, trainer.global_step, saved))

    L.seed_everything(0, verbose=False)
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8), outer_optimizer="trpo", baseline="linear", value_coef=0.0, first_order=True)
    assert not module.uses_critic
    trainer = quiet_trainer(3, [RunCheckpoint(), Probe()], enable_checkpointing=True, default_root_dir=str(tmp_path))
    trainer.fit(module, MetaTaskDataModule("nav2d", seed=0, meta_batch_size=4, rollouts_per_task=2, max_episode_steps=10))
    # Epoch e starts with e TRPO steps taken and epoch e - 1's last.ckpt on disk.
    assert seen == [(0, 0, None), (1, 1, 0), (2, 2, 1)]
    assert trainer.global_step == 3
