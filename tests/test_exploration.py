"""``model.exploration_coef`` (E-MAML): the support rollouts' term of the meta-gradient.

Oracles: the gradient of the term against the Gaussian score function written out by hand, the
clip against the PPO surrogate's definition, and in the module: chunks of agents give the
one-piece update with the term on, and the term changes what one meta-iteration learns.
"""

import lightning as L
import pytest
import torch

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.algorithms.ppo import gaussian_log_prob
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule
from metarl_lightning.objectives import exploration_loss, post_adaptation_advantages
from metarl_lightning.policies import MLPActorCritic, SSMActorCritic
from metarl_lightning.rollout_data import Rollout
from tests.helpers import quiet_trainer

K, E, T, OBS, ACT = 3, 2, 5, 4, 2


def _actor_means(policy: MLPActorCritic, params: dict[str, torch.Tensor], observations: torch.Tensor) -> torch.Tensor:
    """``[K, E, T, A]`` action means, agent ``k`` under slice ``k`` of the stacked ``params``."""
    actor = {name[len("actor."):]: value for name, value in params.items() if name.startswith("actor.")}
    return torch.stack([torch.func.functional_call(policy.actor, {n: v[k] for n, v in actor.items()}, (observations[k],))
                        for k in range(observations.shape[0])])


def _log_probs(policy: MLPActorCritic, params: dict[str, torch.Tensor], rollout: Rollout) -> torch.Tensor:
    return gaussian_log_prob(_actor_means(policy, params, rollout.observations), params["log_std"][:, None, None], rollout.actions)


def _support(policy: MLPActorCritic, params: dict[str, torch.Tensor]) -> Rollout:
    """Actions sampled from ``policy`` under ``params``, with their acting log-probs (ratio 1)."""
    g = torch.Generator().manual_seed(0)
    shape = (K, E, T)
    observations = torch.randn(*shape, OBS, generator=g)
    with torch.no_grad():
        mean = _actor_means(policy, params, observations)
        actions = mean + torch.exp(params["log_std"][:, None, None]) * torch.randn(*shape, ACT, generator=g)
        log_probs = gaussian_log_prob(mean, params["log_std"][:, None, None], actions)
    resets = torch.zeros(shape, dtype=torch.bool)
    resets[:, :, 0] = True
    zeros = torch.zeros(shape)
    return Rollout(
        observations=observations, actions=actions, log_probs=log_probs, values=zeros, next_values=zeros,
        rewards=zeros, terminated=torch.zeros(shape, dtype=torch.bool), truncated=torch.zeros(shape, dtype=torch.bool),
        resets=resets, initial_state=torch.zeros(K, E, 1), episode_return=torch.zeros(K), episode_success=torch.zeros(K),
    )


def _stacked(policy: MLPActorCritic, shift_log_std: float = 0.0) -> dict[str, torch.Tensor]:
    params = stack_for_agents(dict(policy.named_parameters()), K)
    return {k: (v.detach() + (shift_log_std if k == "log_std" else 0.0)).requires_grad_(True) for k, v in params.items()}


def test_the_gradient_is_the_score_function_weighted_by_each_agents_post_adaptation_advantage():
    torch.manual_seed(0)
    policy = MLPActorCritic(OBS, ACT, hidden_dim=8, init_log_std=-0.3)
    theta = _stacked(policy)
    support = _support(policy, theta)
    advantages = post_adaptation_advantages(torch.tensor([100.0, 250.0, 40.0]))
    assert torch.allclose(advantages.mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(advantages.std(unbiased=False), torch.tensor(1.0), atol=1e-6)
    assert advantages.argmax() == 1 and advantages.argmin() == 2
    assert torch.equal(post_adaptation_advantages(torch.tensor([7.0])), torch.zeros(1))  # no other agent: no signal

    loss = exploration_loss(policy, theta, support, advantages, clip_epsilon=0.2)
    (grad,) = torch.autograd.grad(loss, theta["log_std"])
    # At ratio 1 the loss is -mean_{k,e,t}(A_k log pi), and d log N(a; mu, sigma) / d log sigma_i
    # = z_i^2 - 1 with z = (a - mu) / sigma: agent k's gradient is -A_k mean_{e,t}(z^2 - 1) / K.
    with torch.no_grad():
        log_std = theta["log_std"][:, None, None]
        z = (support.actions - _actor_means(policy, theta, support.observations)) * torch.exp(-log_std)
        expected = -(advantages[:, None] * (z.pow(2) - 1).mean((1, 2))) / K
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_the_ratio_is_clipped_as_in_ppo():
    """Away from the acting policy, the samples whose ratio left the clip range carry no gradient."""
    torch.manual_seed(0)
    policy = MLPActorCritic(OBS, ACT, hidden_dim=8)
    support = _support(policy, _stacked(policy))
    moved = _stacked(policy, shift_log_std=0.3)
    advantages = torch.tensor([1.0, -1.0, 0.5])
    loss = exploration_loss(policy, moved, support, advantages, clip_epsilon=0.2)
    (grad,) = torch.autograd.grad(loss, moved["log_std"])

    ratio = torch.exp(_log_probs(policy, moved, support) - support.log_probs)
    a = advantages[:, None, None]
    with torch.no_grad():  # PPO's min(r A, clip(r) A) is r A exactly where it is not clipped away
        unclipped = (ratio * a <= ratio.clamp(0.8, 1.2) * a) | ((ratio >= 0.8) & (ratio <= 1.2))
    assert 0 < unclipped.float().mean() < 1
    torch.testing.assert_close(loss, -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a).mean())
    (expected,) = torch.autograd.grad(-(ratio * a * unclipped).sum() / ratio.numel(), moved["log_std"])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def _train(exploration_coef: float, agent_chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MetaRLModule(SSMActorCritic(2, 2, hidden_dim=8, state_dim=4, num_layers=1), ppo_epochs=2,
                          exploration_coef=exploration_coef, agent_chunk_size=agent_chunk_size)
    data = MetaTaskDataModule("nav2d", seed=0, meta_batch_size=4, rollouts_per_task=2, max_episode_steps=10)
    quiet_trainer(2, []).fit(module, data)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_module_adds_the_term_and_agent_chunks_keep_the_one_piece_update():
    plain, explored, chunked = _train(0.0), _train(1.0), _train(1.0, agent_chunk_size=3)
    assert any(not torch.allclose(plain[k], explored[k]) for k in plain)
    for name in explored:
        torch.testing.assert_close(chunked[name], explored[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"exploration_coef": -0.1}, "must be >= 0"), ({"exploration_coef": 0.1, "inner_steps": 0}, "needs a support rollout"),
     ({"exploration_coef": 0.1, "outer_optimizer": "trpo"}, "needs a support rollout")],
)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=f"model.exploration_coef.*{message}"):
        MetaRLModule(MLPActorCritic(2, 2), **kwargs)
