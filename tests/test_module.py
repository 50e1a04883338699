"""MetaRLModule behaviour that is not learning: the KL early stop of the outer PPO epochs."""

import pytest

from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic
from tests.helpers import train_nav2d

TINY = dict(meta_batch_size=2, rollouts_per_task=2, max_episode_steps=10)


@pytest.mark.parametrize("target_kl, expected_epochs", [(None, 4.0), (1e-12, 1.0)])
def test_target_kl_stops_outer_epochs(target_kl, expected_epochs):
    history = train_nav2d(MLPActorCritic(2, 2, hidden_dim=8), epochs=1, data_kwargs=TINY, ppo_epochs=4, target_kl=target_kl)
    # The first epoch always steps (its KL is 0 by construction); any movement then exceeds 1.5e-12.
    assert history[0]["train/ppo_epochs_run_epoch"] == expected_epochs


def test_target_kl_must_be_positive():
    with pytest.raises(ConfigError, match="model.target_kl"):
        MetaRLModule(MLPActorCritic(2, 2), target_kl=0.0)
