"""In-context learning on 2-D navigation: RL^2-style (no gradient step at test time), S5 policy.

With context inputs and trial memory, plain PPO on trials of 3 ten-step episodes of one goal (model
``inner_steps: 0``) must learn to do better in the last episode of a trial than in the first: the
goal is hidden, so only the rewards remembered from earlier episodes can say where it is.

Measured (seed 0, S5 2 x 64, std e^-2, meta_lr 1e-3, 8 PPO epochs, target_kl 0.02, 10 tasks x 10
trials per iteration, 100 iterations = 300k env steps, 53 s on the 2-core box beside another run):
returns of episodes 1, 2, 3 of a trial, 50 held-out goals x 10 trials, stochastic actions:
before training -4.38, -4.34, -4.29 (gain 0.09); after -3.72, -3.32, -3.16 (gain 0.56); the same
policy with the state zeroed at every episode: -3.72 in every episode (no gain without memory).
The thresholds take about half of the measured gain.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.envs.navigation import Navigation2DVectorEnv
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import SSMActorCritic
from metarl_lightning.rollouts import RolloutCollector
from tests.helpers import quiet_trainer

HORIZON, PER_TRIAL = 10, 3


def trial_returns(policy: SSMActorCritic, reset_state_on: str = "trial", tasks: int = 50, trials: int = 10) -> list[float]:
    """Mean return of episode 1, 2, 3 of a trial on held-out goals (stochastic actions, fixed noise)."""
    env = Navigation2DVectorEnv(tasks, trials, HORIZON)
    env.set_tasks(env.sample_tasks(tasks, np.random.default_rng(123)))
    per_trial = PER_TRIAL if reset_state_on == "trial" else None
    collector = RolloutCollector(env, reset_state_on=reset_state_on, episodes_per_trial=per_trial, context_reward_scale=1.0)
    noise = torch.randn(tasks, trials, HORIZON * PER_TRIAL, 2, generator=torch.Generator().manual_seed(123))
    rollout = collector.collect(policy, None, HORIZON * PER_TRIAL, noise)
    if reset_state_on == "episode":
        return rollout.rewards.reshape(tasks, trials, PER_TRIAL, HORIZON).sum(-1).mean((0, 1)).tolist()
    return rollout.trial_episode_returns().tolist()


@pytest.mark.slow
def test_s5_with_context_inputs_and_trial_memory_learns_in_context():
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = MetaTaskDataModule(
        "nav2d", meta_batch_size=10, rollouts_per_task=30, envs_per_task=10, max_episode_steps=HORIZON,
        reset_state_on="trial", episodes_per_trial=PER_TRIAL, context_inputs=True, seed=0,
    )
    policy = SSMActorCritic(data.observation_dim, data.action_dim, init_log_std=-2.0)
    before = trial_returns(policy)
    module = MetaRLModule(policy, inner_steps=0, meta_lr=1e-3, ppo_epochs=8, target_kl=0.02)
    quiet_trainer(100, []).fit(module, data)
    assert int(module.env_steps) == 100 * 10 * 30 * HORIZON  # one rollout per iteration (no support)
    after = trial_returns(policy)
    assert after[-1] - after[0] > 0.3, f"no in-context gain: episodes {after} (before training {before})"
    assert after[-1] - after[0] > (before[-1] - before[0]) + 0.2, (before, after)
    assert after[0] > before[0] + 0.3, f"the first episode did not improve: {before[0]:.2f} -> {after[0]:.2f}"
    # Without memory across episodes the same policy gains nothing from one episode to the next.
    without_memory = trial_returns(policy, reset_state_on="episode")
    assert abs(without_memory[-1] - without_memory[0]) < 0.15, without_memory
