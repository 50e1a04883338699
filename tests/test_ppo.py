"""PPO loss against numbers computed by hand."""

import math

import pytest
import torch

from metarl_lightning.algorithms.ppo import (
    clipped_surrogate_loss,
    gaussian_entropy,
    gaussian_log_prob,
    normalize_advantages,
    ppo_loss,
    value_loss,
)


def test_clipped_surrogate_by_hand():
    # ratios 1.5, 0.5, 1.1 with eps 0.2 and advantages +1, +1, -2:
    #   min(1.5, 1.2) * 1 = 1.2; min(0.5, 0.8) * 1 = 0.5; min(1.1*-2, 1.1*-2) = -2.2
    log_ratio = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    adv = torch.tensor([1.0, 1.0, -2.0])
    loss = clipped_surrogate_loss(log_ratio, torch.zeros(3), adv, clip_epsilon=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3)


def test_negative_advantage_is_clipped_from_below():
    # ratio 0.5 < 1 - eps with A = -1: min(-0.5, -0.8) = -0.8 (the pessimistic bound)
    loss = clipped_surrogate_loss(torch.log(torch.tensor([0.5])), torch.zeros(1), torch.tensor([-1.0]), 0.2)
    assert loss.item() == pytest.approx(0.8)


def test_value_loss_plain_and_clipped():
    values, returns, old = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0])
    assert value_loss(values, returns).item() == pytest.approx(0.5 * 4.0)
    # clipped value: 1 + clip(1, -0.5, 0.5) = 1.5 -> error 2.25; max(4, 2.25) = 4
    assert value_loss(values, returns, old, 0.5).item() == pytest.approx(2.0)
    # a value that moved the right way but too far: plain error 0.25, clipped 1.5 -> 2.25 wins
    assert value_loss(torch.tensor([-0.5]), returns, torch.tensor([2.0]), 0.5).item() == pytest.approx(0.5 * 2.25)


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    mean, log_std, action = torch.randn(4, 3), torch.randn(3), torch.randn(4, 3)
    dist = torch.distributions.Normal(mean, log_std.exp())
    assert torch.allclose(gaussian_log_prob(mean, log_std, action), dist.log_prob(action).sum(-1), atol=1e-6)
    assert torch.allclose(gaussian_entropy(log_std, mean), dist.entropy().sum(-1), atol=1e-6)


def test_ppo_loss_uses_normalized_advantages_and_combines_terms():
    log_probs = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    old = torch.zeros(3)
    adv = torch.tensor([3.0, 1.0, -4.0])
    values, returns, entropy = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 5.0]), torch.tensor([0.7, 0.7, 0.7])
    out = ppo_loss(log_probs, old, adv, values, returns, entropy, clip_epsilon=0.2, value_coef=0.5, entropy_coef=0.01)
    norm = (adv - adv.mean()) / adv.std(unbiased=False)
    expected_policy = clipped_surrogate_loss(log_probs, old, norm, 0.2)
    assert out.policy.item() == pytest.approx(expected_policy.item(), rel=1e-6)
    # and it is NOT the loss of the raw advantages (the bug this guards against)
    assert abs(out.policy.item() - clipped_surrogate_loss(log_probs, old, adv, 0.2).item()) > 0.05
    assert out.value.item() == pytest.approx(0.5 * (1 + 0 + 4) / 3)
    assert out.total.item() == pytest.approx(out.policy.item() + 0.5 * out.value.item() - 0.01 * 0.7, rel=1e-6)
    ratios = torch.tensor([1.5, 0.5, 1.1])
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    assert out.approx_kl.item() == pytest.approx((ratios - 1 - ratios.log()).mean().item(), rel=1e-6)
    assert normalize_advantages(adv).std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert math.isfinite(out.total.item())
