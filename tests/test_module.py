"""MetaRLModule behaviour that is not learning: the KL early stop of the outer PPO epochs."""

import math

import lightning as L
import pytest
import torch

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic
from tests.helpers import EpochMetrics, quiet_trainer, train_nav2d

TINY = dict(meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)


@pytest.mark.parametrize("target_kl, expected_epochs", [(None, 4.0), (1e-12, 1.0)])
def test_target_kl_stops_outer_epochs(target_kl, expected_epochs):
    history = train_nav2d(MLPActorCritic(2, 2, hidden_dim=8), epochs=1, data_kwargs=TINY, ppo_epochs=4, target_kl=target_kl)
    # The first epoch always steps (its KL is 0 by construction); any movement then exceeds 1.5e-12.
    assert history[0]["train/ppo_epochs_run"] == expected_epochs


def test_target_kl_must_be_positive():
    with pytest.raises(ConfigError, match="model.target_kl"):
        MetaRLModule(MLPActorCritic(2, 2), target_kl=0.0)


def test_head_only_adaptation_adapts_the_action_head_and_log_std_only():
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8, num_layers=2), inner_parameters="head")
    assert module._adapted_names() == {"actor.4.weight", "actor.4.bias", "log_std"}
    with pytest.raises(ConfigError, match="model.inner_parameters"):
        MetaRLModule(MLPActorCritic(2, 2), inner_parameters="body")


def test_meta_sgd_step_sizes_start_at_inner_lr_and_are_optimised():
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8), inner_lr=0.05, learn_inner_lr=True)
    sizes = module.inner_step_sizes()
    assert set(sizes) == module._adapted_names()
    assert all(torch.allclose(v, torch.full_like(v, 0.05)) for v in sizes.values())
    groups = {g["name"]: g for g in module.configure_optimizers().param_groups}
    assert {id(p) for p in groups["inner_lr"]["params"]} == {id(p) for p in module.inner_log_lrs.values()}
    assert groups["inner_lr"]["weight_decay"] == 0.0


def test_meta_sgd_step_sizes_move_in_training():
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=8), inner_lr=0.05, learn_inner_lr=True)
    quiet_trainer(2, []).fit(module, MetaTaskDataModule("nav2d", seed=0, **TINY))
    moved = max((v.detach() - math.log(0.05)).abs().max().item() for v in module.inner_log_lrs.values())
    assert moved > 1e-4


def _trained_parameters(agent_chunk_size, policy_factory):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MetaRLModule(policy_factory(), ppo_epochs=2, agent_chunk_size=agent_chunk_size, first_order=False)
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=4, rollouts_per_task=2, max_episode_steps=10)
    quiet_trainer(2, []).fit(module, data)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("chunk", [1, 3])
def test_agent_chunks_give_the_one_piece_meta_gradient(chunk):
    """Second-order MAML through the S5 scan: chunks of 1 and of 3 (uneven: 3 + 1) agents end two
    meta-iterations with the parameters of the one-piece update."""
    from metarl_lightning.policies import SSMActorCritic

    def factory():
        return SSMActorCritic(2, 2, hidden_dim=8, state_dim=4, num_layers=1)

    whole, chunked = _trained_parameters(None, factory), _trained_parameters(chunk, factory)
    assert whole.keys() == chunked.keys()
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_agent_chunk_size_must_be_positive():
    with pytest.raises(ConfigError, match="model.agent_chunk_size"):
        MetaRLModule(MLPActorCritic(2, 2), agent_chunk_size=0)


def _one_iteration(data_kwargs: dict, **module_kwargs):
    """Parameters, metrics and total parameter movement after one meta-iteration on nav2d (MLP)."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    policy = MLPActorCritic(2, 2, hidden_dim=8)
    module = MetaRLModule(policy, ppo_epochs=2, **module_kwargs)
    recorder = EpochMetrics()
    start = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    quiet_trainer(1, [recorder]).fit(module, MetaTaskDataModule("nav2d", seed=0, max_episode_steps=10, **data_kwargs))
    moved = sum((v - start[k]).abs().sum().item() for k, v in policy.state_dict().items())
    return policy.state_dict(), recorder.history[0], moved


def test_outer_minibatches_take_one_adam_step_per_minibatch():
    """Minibatches of all agents are the one-step-per-epoch update exactly; smaller ones take
    ceil(K / size) steps per PPO epoch (the parameters then move further)."""
    data = dict(meta_batch_size=4, rollouts_per_task=2)
    whole, whole_metrics, whole_moved = _one_iteration(data, outer_minibatch_size=None)
    same, _, _ = _one_iteration(data, outer_minibatch_size=4)
    for name in whole:
        assert torch.equal(whole[name], same[name]), name
    _, metrics, moved = _one_iteration(data, outer_minibatch_size=1)
    assert metrics["train/ppo_epochs_run"] == whole_metrics["train/ppo_epochs_run"] == 2.0
    assert moved > 2 * whole_moved, (moved, whole_moved)
    with pytest.raises(ConfigError, match="model.outer_minibatch_size"):
        MetaRLModule(MLPActorCritic(2, 2), outer_minibatch_size=0)


def test_outer_env_minibatches_split_the_trajectories_of_every_agent():
    """One env group is the one-step-per-epoch update exactly; two groups take two Adam steps per
    PPO epoch (each on half of every agent's trajectories) and move the parameters further."""
    data = dict(meta_batch_size=2, rollouts_per_task=4, envs_per_task=4)
    whole, whole_metrics, whole_moved = _one_iteration(data, outer_env_minibatches=1)
    same, _, _ = _one_iteration(data)
    for name in whole:
        assert torch.equal(whole[name], same[name]), name
    _, metrics, moved = _one_iteration(data, outer_env_minibatches=2)
    assert metrics["train/ppo_epochs_run"] == whole_metrics["train/ppo_epochs_run"] == 2.0
    assert moved > 1.5 * whole_moved, (moved, whole_moved)
    with pytest.raises(ConfigError, match="model.outer_env_minibatches"):
        MetaRLModule(MLPActorCritic(2, 2), outer_env_minibatches=0)
    with pytest.raises(ConfigError, match="model.outer_env_minibatches"):
        _one_iteration(data, outer_env_minibatches=3)


def _two_iterations_without_critic(policy_factory, force_critic: bool, monkeypatch, **module_kwargs):
    """Parameters after two meta-iterations with a linear baseline and no value loss; with
    ``force_critic`` the critic still runs everywhere (acting, values after the rollout, the
    losses), as before the critic was skipped."""
    if force_critic:
        monkeypatch.setattr(MetaRLModule, "uses_critic", property(lambda self: True))
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MetaRLModule(policy_factory(), ppo_epochs=2, baseline="linear", gae_lambda=1.0, value_coef=0.0, **module_kwargs)
    assert module.uses_critic is force_critic
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)
    quiet_trainer(2, []).fit(module, data)
    monkeypatch.undo()
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


@pytest.mark.parametrize("outer", ["ppo", "trpo"])
@pytest.mark.parametrize("policy", ["ssm", "mlp"])
def test_a_linear_baseline_without_value_loss_never_runs_the_critic(policy, outer, monkeypatch):
    """Skipping the unused critic changes nothing the actor learns: second-order MAML through the
    S5 scan (and the MLP), PPO and TRPO outer steps, two meta-iterations, the same actor
    parameters as with the critic run everywhere (and the critic's own never move)."""
    from metarl_lightning.policies import SSMActorCritic

    def factory():
        if policy == "ssm":
            return SSMActorCritic(2, 2, hidden_dim=8, state_dim=4, num_layers=1)
        return MLPActorCritic(2, 2, hidden_dim=8)

    skipped = _two_iterations_without_critic(factory, False, monkeypatch, outer_optimizer=outer)
    full = _two_iterations_without_critic(factory, True, monkeypatch, outer_optimizer=outer)
    L.seed_everything(0, verbose=False)
    start = factory().state_dict()
    moved = 0.0
    for name in full:
        torch.testing.assert_close(skipped[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
        if "critic" in name or "value_head" in name:
            assert torch.equal(skipped[name], start[name]), name
        else:
            moved += (skipped[name] - start[name]).abs().sum().item()
    assert moved > 0
    # A critic baseline, or a value loss, keeps the critic.
    assert MetaRLModule(factory(), baseline="critic", value_coef=0.0).uses_critic
    assert MetaRLModule(factory(), baseline="linear", value_coef=0.5).uses_critic
