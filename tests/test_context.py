"""In-context adaptation: context inputs, trials, and the state carried across the episodes of a trial.

Oracles: the context of step t is rebuilt by hand from step t-1's action, reward and done; the
recurrent state is checked by recomputing each trial *alone* from the zero state (equal within a
trial, proof that the state was zeroed at the trial start) and the second episode of a trial alone
(different, proof that it was carried); training's parallel scan is compared with the collector's
acting path and with a step-by-step loop; the evaluation adapter is replayed through ``forward``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.algorithms.ppo import gaussian_log_prob
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.envs.context import ContextObservation, context_dim, context_features
from metarl_lightning.envs.navigation import Navigation2DVectorEnv
from metarl_lightning.errors import ConfigError
from metarl_lightning.policies import GRUActorCritic, SSMActorCritic
from metarl_lightning.policies.functional import batched_policy_forward
from metarl_lightning.rollouts import RolloutCollector
from metarl_lightning.trials import trial_ends, trial_episode_returns, value_boundaries

K, E, HORIZON, EPISODES, PER_TRIAL = 2, 3, 6, 4, 2  # two trials of two episodes per env
STEPS = HORIZON * EPISODES
SCALE = 0.5
POLICIES = {"ssm": SSMActorCritic, "gru": GRUActorCritic}


def test_context_features_are_clipped_action_scaled_reward_and_done():
    action = np.array([[2.0, -0.5], [-3.0, 0.25]])
    features = context_features(action, np.array([4.0, -1.0]), np.array([True, False]), reward_scale=0.1)
    assert features.dtype == np.float32 and features.shape == (2, context_dim(2))
    np.testing.assert_allclose(features, [[1.0, -0.5, 0.4, 1.0], [-1.0, 0.25, -0.1, 0.0]], rtol=1e-6)


def test_action_scale_zero_keeps_the_layout_and_zeroes_only_the_action_inputs():
    action, reward, done = np.array([[2.0, -0.5]]), np.array([4.0]), np.array([True])
    features = context_features(action, reward, done, reward_scale=0.1, action_scale=0.0)
    np.testing.assert_allclose(features, [[0.0, 0.0, 0.4, 1.0]], rtol=1e-6)
    _, _, collector, r = _nav_rollout("ssm", context_action_scale=0.0)
    ctx = r.observations[..., 2:]
    assert torch.equal(ctx[..., :2], torch.zeros_like(ctx[..., :2]))
    inside = [t for t in range(1, STEPS) if t != HORIZON * PER_TRIAL]  # not a trial start
    torch.testing.assert_close(ctx[:, :, inside, 2], SCALE * r.rewards[:, :, [t - 1 for t in inside]])
    assert ctx[:, :, HORIZON * PER_TRIAL].abs().sum() == 0


def test_value_boundaries_cut_the_return_only_where_the_state_resets():
    truncated = torch.tensor([[False, True, False, True, False, True]])
    terminated = torch.zeros_like(truncated)
    resets = torch.tensor([[True, False, False, False, True, False]])  # trials: steps 0-3 and 4-5
    assert trial_ends(resets).tolist() == [[False, False, False, True, False, True]]
    _, cut = value_boundaries(terminated, truncated, resets)
    assert cut.tolist() == [[False, False, False, True, False, True]]  # the episode end at 1 is inside a trial


def _nav_rollout(kind: str, seed: int = 0, tasks_seed: int = 0, context: bool = True, **collector_kwargs):
    torch.manual_seed(seed)
    env = Navigation2DVectorEnv(K, E, HORIZON)
    env.set_tasks(env.sample_tasks(K, np.random.default_rng(tasks_seed)))
    collector = RolloutCollector(
        env,
        context_reward_scale=SCALE if context else None,
        **({"reset_state_on": "trial", "episodes_per_trial": PER_TRIAL} | collector_kwargs),
    )
    policy = POLICIES[kind](collector.observation_dim, 2)
    # Off the initial values (tiny action head, slow modes), so that memory visibly changes actions.
    params = {k: v.detach() + 0.3 * torch.randn(K, *v.shape[1:]) for k, v in stack_for_agents(dict(policy.named_parameters()), K).items()}
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(seed + 1))
    return policy, params, collector, collector.collect(policy, params, STEPS, noise)


def test_context_inputs_carry_the_previous_step_and_are_zero_at_trial_starts():
    _, _, collector, r = _nav_rollout("ssm")
    assert collector.observation_dim == 2 + context_dim(2)
    obs, ctx = r.observations[..., :2], r.observations[..., 2:]
    trial_starts = [0, HORIZON * PER_TRIAL]
    episode_starts = [HORIZON * i for i in range(EPISODES)]
    for t in range(STEPS):
        if t in trial_starts:
            assert torch.equal(ctx[:, :, t], torch.zeros_like(ctx[:, :, t])), t
            continue
        torch.testing.assert_close(ctx[:, :, t, :2], r.actions[:, :, t - 1].clamp(-1, 1), msg=f"action {t}")
        torch.testing.assert_close(ctx[:, :, t, 2], SCALE * r.rewards[:, :, t - 1], msg=f"reward {t}")
        expected_done = float(t in episode_starts)  # an episode start inside a trial
        assert (ctx[:, :, t, 3] == expected_done).all(), t
        assert bool((r.truncated[:, :, t - 1]).all()) == (t in episode_starts)
    # The env part is the bare observation: the origin at every episode start.
    for t in episode_starts:
        assert torch.equal(obs[:, :, t], torch.zeros_like(obs[:, :, t]))


def test_context_is_zero_again_after_a_task_change():
    _, params, collector, first = _nav_rollout("ssm")
    policy = POLICIES["ssm"](collector.observation_dim, 2)
    collector.env.set_tasks(collector.env.sample_tasks(K, np.random.default_rng(7)))
    second = collector.collect(policy, None, STEPS, torch.randn(K, E, STEPS, 2))
    assert first.observations[:, :, -1, 2:].abs().sum() > 0  # the last step had a context
    assert torch.equal(second.observations[:, :, 0, 2:], torch.zeros(K, E, context_dim(2)))
    assert second.resets[:, :, 0].all()


def _segment_values(policy, params, r, start: int, stop: int) -> torch.Tensor:
    """Values of steps ``start:stop`` recomputed alone, from the zero state with no resets."""
    obs = r.observations[:, :, start:stop]
    no_resets = torch.zeros(obs.shape[:3], dtype=torch.bool)
    return batched_policy_forward(policy, params, obs, r.initial_state, no_resets).value


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_state_is_carried_within_a_trial_and_zeroed_between_trials(kind):
    policy, params, _, r = _nav_rollout(kind)
    trial = HORIZON * PER_TRIAL
    expected_resets = torch.zeros(STEPS, dtype=torch.bool)
    expected_resets[[0, trial]] = True
    assert torch.equal(r.resets, expected_resets.expand(K, E, STEPS))
    # Training's recomputation (parallel scan for S5) over the whole rollout == the acting path.
    out = batched_policy_forward(policy, params, r.observations, r.initial_state, r.resets)
    torch.testing.assert_close(gaussian_log_prob(out.mean, out.log_std, r.actions), r.log_probs, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.value, r.values, rtol=0, atol=1e-5)
    # Each trial alone from the zero state gives the same values: the state was zeroed in between ...
    for start in (0, trial):
        torch.testing.assert_close(_segment_values(policy, params, r, start, start + trial), r.values[:, :, start : start + trial], rtol=0, atol=1e-5)
    # ... and the second episode of a trial alone does not: the state was carried into it.
    alone = _segment_values(policy, params, r, HORIZON, trial)
    assert (alone - r.values[:, :, HORIZON:trial]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_scan_with_trial_resets_equals_the_step_by_step_state(kind):
    policy, params, _, r = _nav_rollout(kind)
    theta = {k: v[0] for k, v in params.items()}
    obs, resets, state = r.observations[0], r.resets[0], r.initial_state[0]  # agent 0: (E, T, D)
    scanned = functional_call(policy, theta, (obs, state, resets))
    h = state
    for t in range(STEPS):
        step = functional_call(policy, theta, (obs[:, t : t + 1], h, resets[:, t : t + 1]))
        torch.testing.assert_close(step.value[:, 0], scanned.value[:, t], rtol=0, atol=1e-5)
        h = step.state
    torch.testing.assert_close(h, scanned.state, rtol=0, atol=1e-5)


def test_returns_run_through_episode_ends_inside_a_trial():
    _, _, _, r = _nav_rollout("ssm")
    trial = HORIZON * PER_TRIAL
    # Inside the trial the next value is the next episode's first value (same memory) ...
    torch.testing.assert_close(r.next_values[:, :, HORIZON - 1], r.values[:, :, HORIZON])
    # ... at a trial end it is the bootstrap from the final observation, not the next trial's first.
    assert (r.next_values[:, :, trial - 1] - r.values[:, :, trial]).abs().min() > 1e-6
    r.compute_advantages(gamma=0.9, gae_lambda=1.0)
    # lambda 1: the return at the first step of a trial is the discounted reward sum of the whole
    # trial plus the discounted bootstrap at its end.
    discounts = 0.9 ** torch.arange(trial, dtype=torch.float32)
    expected = (r.rewards[:, :, :trial] * discounts).sum(-1) + 0.9**trial * r.next_values[:, :, trial - 1]
    torch.testing.assert_close(r.returns[:, :, 0], expected, rtol=1e-5, atol=1e-4)


def test_episode_mode_zeroes_state_and_context_at_every_episode_start():
    _, _, _, r = _nav_rollout("ssm", reset_state_on="episode", episodes_per_trial=None)
    starts = torch.arange(STEPS) % HORIZON == 0
    assert torch.equal(r.resets, starts.expand(K, E, STEPS))
    assert torch.equal(r.observations[:, :, starts, 2:], torch.zeros(K, E, EPISODES, context_dim(2)))


# ---------------------------------------------------------------------------------- data module
@pytest.mark.parametrize("per_agent", [True, False], ids=["per-agent", "theta"])
@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_a_rollout_started_where_another_ended_continues_its_trial(kind, per_agent):
    """Oracle: one rollout of 2T steps (one trial) == a rollout of T steps, then one of T steps
    started from the first one's final state and context (``query_state: carry``); with per-agent
    parameters and with theta shared by all agents (the acting steps lay their state out apart)."""
    policy, params, collector, whole = _nav_rollout(kind, reset_state_on="trial", episodes_per_trial=None)
    if not per_agent:
        theta = {k: v[0] for k, v in params.items()}
        with torch.no_grad():
            for name, p in policy.named_parameters():
                p.copy_(theta[name])
        params = stack_for_agents(theta, K)
        whole = collector.collect(policy, None, STEPS, torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1)))
    acting = params if per_agent else None
    half = STEPS // 2
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1))  # _nav_rollout's noise
    first = collector.collect(policy, acting, half, noise[:, :, :half].contiguous())
    final_state = batched_policy_forward(policy, params, first.observations, first.initial_state, first.resets).state
    second = collector.collect(
        policy, acting, half, noise[:, :, half:].contiguous(), start_state=final_state, start_context=first.final_context
    )
    assert not second.resets[..., 0].any() and torch.equal(second.initial_state, final_state)
    assert (second.observations[:, :, 0, -1] == 1).all()  # the first step starts an episode of the trial
    for name in ("observations", "actions", "log_probs", "values", "rewards", "resets"):
        torch.testing.assert_close(getattr(second, name), getattr(whole, name)[:, :, half:], rtol=0, atol=1e-4, msg=name)
    # Training's recomputation of the second rollout from its start state == what it acted with.
    out = batched_policy_forward(policy, params, second.observations, second.initial_state, second.resets)
    torch.testing.assert_close(gaussian_log_prob(out.mean, out.log_std, second.actions), second.log_probs, rtol=0, atol=1e-4)
    # From the zero state instead, the same inputs act differently: the state did carry.
    fresh = collector.collect(policy, acting, half, noise[:, :, half:].contiguous())
    assert (fresh.values - whole.values[:, :, half:]).abs().max() > 1e-3


def test_data_module_links_the_context_size_and_refuses_bad_trials():
    assert MetaTaskDataModule("nav2d").observation_dim == 2
    assert MetaTaskDataModule("nav2d", context_inputs=True).observation_dim == 2 + 4
    assert MetaTaskDataModule("ML10", context_inputs=True).observation_dim == 39 + 6
    assert MetaTaskDataModule("ML10", context_inputs=True).context_reward_scale == 0.1
    ok = MetaTaskDataModule("nav2d", rollouts_per_task=8, envs_per_task=2, reset_state_on="trial", episodes_per_trial=2)
    assert ok.episodes_per_trial == 2
    bad = {
        "data.context_inputs": dict(benchmark="MT10", context_inputs=True),
        "data.episodes_per_trial": dict(rollouts_per_task=8, envs_per_task=2, reset_state_on="trial", episodes_per_trial=3),
        "data.context_reward_scale": dict(context_inputs=True, context_reward_scale=0.0),
        "data.query_state": dict(query_state="carry"),  # no trials: nothing to carry
    }
    for field, kwargs in bad.items():
        with pytest.raises(ConfigError, match=field):
            MetaTaskDataModule(**kwargs)
    with pytest.raises(ConfigError, match="data.episodes_per_trial: needs data.reset_state_on: trial"):
        MetaTaskDataModule(episodes_per_trial=1)
    with pytest.raises(ConfigError, match="eval_rollouts_per_task"):
        MetaTaskDataModule(rollouts_per_task=4, eval_rollouts_per_task=2, reset_state_on="trial", episodes_per_trial=4)


def test_trial_episode_returns_average_the_ith_episode_of_every_trial():
    _, _, _, r = _nav_rollout("ssm")
    per_episode = r.rewards.reshape(K, E, EPISODES, HORIZON).sum(-1)  # episodes 0, 1 | 2, 3 form trials
    expected = torch.stack([per_episode[:, :, [0, 2]].mean(), per_episode[:, :, [1, 3]].mean()])
    torch.testing.assert_close(r.trial_episode_returns(), expected)
    # A rollout cut in the middle of an episode: the unfinished episode does not count.
    cut = trial_episode_returns(*(x[..., : STEPS - 2] for x in (r.rewards, r.terminated, r.truncated, r.resets)))
    torch.testing.assert_close(cut, torch.stack([per_episode[:, :, [0, 2]].mean(), per_episode[:, :, 1].mean()]))


def test_maml_query_trials_carry_on_from_the_support_trials():
    """``data.query_state: carry`` through the module: each env's query trial starts from the state
    (the scan over the support with theta) and the context where its support trial ended."""
    import lightning as L

    from metarl_lightning.module import MetaRLModule

    L.seed_everything(0, verbose=False)
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=2, rollouts_per_task=4, envs_per_task=2, max_episode_steps=5,
                              reset_state_on="trial", context_inputs=True, query_state="carry")  # fmt: skip
    data.setup("fit")
    module = MetaRLModule(SSMActorCritic(data.observation_dim, 2, hidden_dim=16, state_dim=8), inner_lr=0.1)
    batch = data.meta_batch("train", 0)
    support, query = module.adapt_and_collect(batch, data.train_collector, data.rollout_steps, data.query_state)
    theta = stack_for_agents(dict(module.policy.named_parameters()), 2)
    with torch.no_grad():
        final = batched_policy_forward(module.policy, theta, support.observations, support.initial_state, support.resets).state
    torch.testing.assert_close(query.initial_state, final)
    assert final.abs().max() > 0 and not query.resets[..., 0].any()
    last_action = support.actions[:, :, -1].clamp(-1, 1)  # nav2d clips to the action box of the context
    torch.testing.assert_close(query.observations[:, :, 0, 2:4], last_action)
    torch.testing.assert_close(query.observations[:, :, 0, 4], support.rewards[:, :, -1])  # nav2d reward scale 1
    assert (query.observations[:, :, 0, 5] == 1).all()
    _, fresh = module.adapt_and_collect(batch, data.train_collector, data.rollout_steps, "fresh")
    assert fresh.resets[..., 0].all() and fresh.initial_state.abs().max() == 0
