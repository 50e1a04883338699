"""The multi-agent collector: bootstrap values, rollout/training consistency, and its two acting paths."""

import numpy as np
import pytest
import torch

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.algorithms.ppo import gaussian_log_prob
from metarl_lightning.envs.navigation import Navigation2DVectorEnv
from metarl_lightning.policies import GRUActorCritic, MLPActorCritic, SSMActorCritic
from metarl_lightning.policies.functional import batched_policy_forward
from metarl_lightning.rollouts import RolloutCollector

POLICIES = {"mlp": MLPActorCritic, "ssm": SSMActorCritic, "gru": GRUActorCritic}
K, E, HORIZON, STEPS = 3, 4, 20, 50  # 2.5 episodes: two truncations and a cut at the end


def collect(kind: str, per_agent: bool, values_after_rollout: bool = True):
    torch.manual_seed(0)
    policy = POLICIES[kind](2, 2)
    env = Navigation2DVectorEnv(K, E, HORIZON)
    env.set_tasks(env.sample_tasks(K, np.random.default_rng(0)))
    params = {k: v.detach() for k, v in stack_for_agents(dict(policy.named_parameters()), K).items()}
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1))
    collector = RolloutCollector(env, values_after_rollout=values_after_rollout)
    return policy, params, collector.collect(policy, params if per_agent else None, STEPS, noise)


@pytest.mark.parametrize("per_agent", [True, False], ids=["per-agent", "theta"])
@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_values_after_the_rollout_equal_the_critic_run_while_acting(kind, per_agent):
    # Two truncations per env inside the rollout and a cut at its end: the inserted final
    # observations must give the same bootstrap values as the recurrent critic stepped in place.
    _, _, after = collect(kind, per_agent, values_after_rollout=True)
    _, _, during = collect(kind, per_agent, values_after_rollout=False)
    assert after.truncated.sum() == 2 * K * E
    for field in ("values", "next_values", "actions", "log_probs"):
        torch.testing.assert_close(getattr(after, field), getattr(during, field), rtol=0, atol=2e-5, msg=field)
    truncated_next = after.next_values[after.truncated]
    assert (truncated_next != 0).all()


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_shared_theta_path_equals_per_agent_path(kind):
    _, _, per_agent = collect(kind, per_agent=True)
    _, _, shared = collect(kind, per_agent=False)
    for field in ("observations", "actions", "log_probs", "values", "next_values", "rewards", "episode_return"):
        assert torch.allclose(getattr(per_agent, field), getattr(shared, field), atol=1e-5), field
    assert torch.equal(per_agent.truncated, shared.truncated)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_training_recomputes_what_the_rollout_computed(kind):
    policy, params, rollout = collect(kind, per_agent=True)
    out = batched_policy_forward(policy, params, rollout.observations, rollout.initial_state, rollout.resets)
    assert torch.allclose(gaussian_log_prob(out.mean, out.log_std, rollout.actions), rollout.log_probs, atol=1e-4)
    assert torch.allclose(out.value, rollout.values, atol=1e-5)


def test_bootstrap_values_at_truncation_and_rollout_end():
    policy, params, r = collect("mlp", per_agent=True)
    assert r.observations.shape == (K, E, STEPS, 2) and r.truncated.sum() == 2 * K * E
    truncated_at = [HORIZON - 1, 2 * HORIZON - 1]
    for t in range(STEPS - 1):
        if t not in truncated_at:
            assert torch.equal(r.next_values[:, :, t], r.values[:, :, t + 1]), t
    # At a truncation: the value of the final observation (position before the reset), not of the
    # next episode's first observation (the origin) and not zero.
    for t in truncated_at:
        assert torch.equal(r.resets[:, :, t + 1], torch.ones(K, E, dtype=torch.bool))
        final_obs = r.observations[:, :, t] + r.actions[:, :, t].clamp(-0.1, 0.1)
        expected = batched_policy_forward(policy, params, final_obs.unsqueeze(2), r.initial_state, torch.zeros(K, E, 1, dtype=torch.bool)).value[:, :, 0]
        assert torch.allclose(r.next_values[:, :, t], expected, atol=1e-5)
        assert not torch.allclose(r.next_values[:, :, t], r.values[:, :, t + 1])
    # The cut at the end of the rollout (mid-episode) is bootstrapped from the following observation.
    assert (r.next_values[:, :, -1] != 0).all()
    # Returns are per finished episode: 2 per env here.
    per_env = r.rewards[:, :, : 2 * HORIZON].sum(-1) / 2
    assert torch.allclose(r.episode_return, per_env.mean(1), atol=1e-4)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_action_mean_stays_in_the_action_box(kind):
    # An unbounded mean drifted to |mean| ~ 2.3 on ML1 and every action was clipped (collapse).
    torch.manual_seed(0)
    policy = POLICIES[kind](5, 3)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(50.0)
    out = policy(torch.randn(4, 6, 5) * 10, policy.initial_state(4), torch.zeros(4, 6, dtype=torch.bool))
    assert out.mean.abs().max() <= 1.0
    assert out.mean.abs().max() > 0.5  # really saturating: the bound, not small weights, holds it


def test_compiled_acting_step_matches_eager():
    torch.manual_seed(0)
    policy = MLPActorCritic(2, 2, hidden_dim=16)
    env = Navigation2DVectorEnv(K, E, HORIZON)
    env.set_tasks(env.sample_tasks(K, np.random.default_rng(0)))
    params = {k: v.detach() for k, v in stack_for_agents(dict(policy.named_parameters()), K).items()}
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1))
    eager, compiled = RolloutCollector(env), RolloutCollector(env, compile_policy=True)
    for per_agent in (params, None):
        a, b = eager.collect(policy, per_agent, STEPS, noise), compiled.collect(policy, per_agent, STEPS, noise)
        for field in ("actions", "log_probs", "values", "next_values", "rewards"):
            assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), field


def test_pipelined_lanes_give_the_same_rollout_as_stepping_all_envs_at_once():
    from metarl_lightning.envs.benchmarks import make_benchmark
    from metarl_lightning.envs.workers import MetaWorldVectorEnv

    bench = make_benchmark("MT1", "reach-v3", seed=0)
    tasks = bench.sample_tasks("train", 4, np.random.default_rng(0))
    noise = torch.randn(4, 2, 30, 4, generator=torch.Generator().manual_seed(1))
    rollouts = {}
    for kind in ("ssm", "mlp"):
        torch.manual_seed(0)
        policy = POLICIES[kind](39, 4)
        params = {k: v.detach() for k, v in stack_for_agents(dict(policy.named_parameters()), 4).items()}
        with MetaWorldVectorEnv(bench, "train", 4, 2, num_workers=2, max_episode_steps=12) as env:
            env.set_tasks(tasks)
            for pipeline in (False, True):
                collector = RolloutCollector(env, pipeline=pipeline)
                rollouts[kind, pipeline] = collector.collect(policy, params, 30, noise)
        sync, piped = rollouts[kind, False], rollouts[kind, True]
        assert sync.truncated.sum() == 2 * 4 * 2  # two time-limit cuts per env inside the rollout
        for field in ("observations", "actions", "log_probs", "values", "next_values", "rewards", "resets", "episode_return"):
            assert torch.equal(getattr(sync, field), getattr(piped, field)), (kind, field)


@pytest.mark.parametrize("kind", ["ssm", "gru"])
def test_trial_mode_carries_the_state_across_episodes(kind):
    torch.manual_seed(0)
    policy = POLICIES[kind](2, 2)
    env = Navigation2DVectorEnv(K, E, HORIZON)
    env.set_tasks(env.sample_tasks(K, np.random.default_rng(0)))
    # Off the initial values (tiny action head, slow modes), so that memory visibly changes actions.
    params = {k: v.detach() + 0.3 * torch.randn(K, *v.shape[1:]) for k, v in stack_for_agents(dict(policy.named_parameters()), K).items()}
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1))
    rollouts = {mode: RolloutCollector(env, reset_state_on=mode).collect(policy, params, STEPS, noise) for mode in ("trial", "episode")}
    trial, episode = rollouts["trial"], rollouts["episode"]
    assert trial.resets[:, :, 0].all() and not trial.resets[:, :, 1:].any()
    assert episode.resets[:, :, HORIZON].all()
    # Training recomputes exactly what was acted on, with the state carried over episode starts ...
    out = batched_policy_forward(policy, params, trial.observations, trial.initial_state, trial.resets)
    assert torch.allclose(gaussian_log_prob(out.mean, out.log_std, trial.actions), trial.log_probs, atol=1e-4)
    assert torch.allclose(out.value, trial.values, atol=1e-5)
    # ... which makes the second episode act differently from an episode-reset rollout.
    assert torch.allclose(trial.actions[:, :, :HORIZON], episode.actions[:, :, :HORIZON], atol=1e-5)
    assert not torch.allclose(trial.actions[:, :, HORIZON:], episode.actions[:, :, HORIZON:], atol=1e-3)
