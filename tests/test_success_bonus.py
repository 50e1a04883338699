"""``model.success_bonus``: per-step successes recorded by the collector, the bonus in the advantages
(against GAE on rewards shifted by hand), and the module applying it to the outer objective only."""

import numpy as np
import pytest
import torch

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.envs.navigation import Navigation2DVectorEnv
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic
from metarl_lightning.rollout_data import Rollout
from metarl_lightning.rollouts import RolloutCollector

K, E, HORIZON, STEPS = 2, 3, 10, 25


def _nav_rollout(goals: list[np.ndarray]) -> Rollout:
    torch.manual_seed(0)
    policy = MLPActorCritic(2, 2)
    env = Navigation2DVectorEnv(K, E, HORIZON)
    env.set_tasks(goals)
    params = {k: v.detach() for k, v in stack_for_agents(dict(policy.named_parameters()), K).items()}
    noise = torch.randn(K, E, STEPS, 2, generator=torch.Generator().manual_seed(1))
    return RolloutCollector(env).collect(policy, params, STEPS, noise)


def test_collector_records_the_success_of_every_step():
    # The policy sees only its position, so the trajectories do not depend on the goals: put each
    # agent's goal where its env 0 is after step 2, so that step succeeds and most others do not.
    probe = _nav_rollout([np.zeros(2)] * K)
    goals = [(probe.observations[k, 0, 3]).double().numpy() for k in range(K)]
    r = _nav_rollout(goals)
    assert r.successes.shape == (K, E, STEPS) and r.successes.dtype == torch.bool
    after = r.observations + r.actions.clamp(-0.1, 0.1)  # position after each step
    distance = (after - torch.tensor(np.stack(goals), dtype=after.dtype)[:, None, None]).norm(dim=-1)
    assert torch.equal(r.successes, distance < 0.01)
    assert r.successes[:, 0, 2].all() and not r.successes.all()
    # The per-agent episode success is the share of episodes with a success at any step.
    finished = r.successes[:, :, : 2 * HORIZON].reshape(K, E, 2, HORIZON).any(-1).float()
    assert torch.allclose(r.episode_success, finished.mean((1, 2)))
    # Slicing keeps the field aligned with the other per-step fields.
    assert torch.equal(r.agents(slice(1, 2)).envs(slice(0, 2)).successes, r.successes[1:2, 0:2])


def _synthetic(successes: bool = True) -> Rollout:
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 12)
    terminated = torch.zeros(shape, dtype=torch.bool)
    truncated = torch.zeros(shape, dtype=torch.bool)
    truncated[:, :, 5] = truncated[:, :, -1] = True
    resets = torch.zeros(shape, dtype=torch.bool)
    resets[:, :, 0] = resets[:, :, 6] = True
    return Rollout(
        observations=torch.randn(*shape, 4, generator=g),
        actions=torch.randn(*shape, 2, generator=g),
        log_probs=torch.randn(shape, generator=g),
        values=torch.randn(shape, generator=g),
        next_values=torch.randn(shape, generator=g),
        rewards=torch.randn(shape, generator=g),
        terminated=terminated,
        truncated=truncated,
        resets=resets,
        initial_state=torch.zeros(2, 3, 1),
        episode_return=torch.zeros(2),
        episode_success=torch.zeros(2),
        successes=torch.rand(shape, generator=g) < 0.3 if successes else None,
    )


@pytest.mark.parametrize("baseline", ["critic", "linear"])
def test_bonus_is_gae_on_rewards_shifted_at_the_successful_steps(baseline):
    with_bonus, by_hand, plain = _synthetic(), _synthetic(), _synthetic()
    with_bonus.compute_advantages(0.99, 0.95, 0.1, baseline, success_bonus=7.0)
    by_hand.rewards = by_hand.rewards + 7.0 * by_hand.successes.float()
    by_hand.compute_advantages(0.99, 0.95, 0.1, baseline)
    plain.compute_advantages(0.99, 0.95, 0.1, baseline)
    assert torch.allclose(with_bonus.advantages, by_hand.advantages, atol=1e-5)
    assert torch.allclose(with_bonus.returns, by_hand.returns, atol=1e-5)
    assert not torch.allclose(with_bonus.advantages, plain.advantages)
    assert torch.equal(with_bonus.rewards, plain.rewards)  # the logged rewards stay the env's


def test_bonus_without_per_step_successes_is_refused():
    with pytest.raises(ValueError, match="per-step successes"):
        _synthetic(successes=False).compute_advantages(0.99, 0.95, success_bonus=1.0)


def test_module_adds_the_bonus_to_the_outer_objective_only():
    module = MetaRLModule(MLPActorCritic(4, 2), gamma=0.99, gae_lambda=0.95, reward_scale=0.1, success_bonus=5.0)
    inner, outer, by_hand = _synthetic(), _synthetic(), _synthetic()
    module.compute_advantages(inner)
    module.compute_advantages(outer, outer=True)
    by_hand.compute_advantages(0.99, 0.95, 0.1, "critic", success_bonus=5.0)
    plain = _synthetic()
    plain.compute_advantages(0.99, 0.95, 0.1, "critic")
    assert torch.equal(inner.advantages, plain.advantages)
    assert torch.equal(outer.advantages, by_hand.advantages)


def test_negative_bonus_names_the_field():
    with pytest.raises(ConfigError, match="model.success_bonus"):
        MetaRLModule(MLPActorCritic(4, 2), success_bonus=-1.0)
