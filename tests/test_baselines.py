"""Linear feature baseline: time index, returns and the ridge fit against independent oracles."""

from __future__ import annotations

import numpy as np
import torch

from metarl_lightning.algorithms.baselines import (
    baseline_features,
    discounted_returns,
    episode_time_index,
    fit_ridge,
    linear_baseline_values,
)


def test_episode_time_index_restarts_after_every_end() -> None:
    terminated = torch.tensor([[False, False, True, False, False, False]])
    truncated = torch.tensor([[False, False, False, False, True, False]])
    assert episode_time_index(terminated, truncated).tolist() == [[0, 1, 2, 0, 1, 0]]


def test_discounted_returns_match_a_python_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(3, 12, generator=gen, dtype=torch.float64)
    ends = torch.rand(3, 12, generator=gen) < 0.25
    gamma = 0.9
    got = discounted_returns(rewards, ends, gamma)
    for row in range(3):
        running = 0.0
        for t in reversed(range(12)):
            if ends[row, t]:
                running = 0.0
            running = rewards[row, t].item() + gamma * running
            assert abs(got[row, t].item() - running) < 1e-12


def test_fit_ridge_equals_numpy_least_squares_of_the_augmented_system() -> None:
    # Ridge = ordinary least squares on [F; sqrt(reg) I] w = [y; 0]: an independent solve.
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(4, 50, 7, generator=gen, dtype=torch.float64)
    targets = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    reg = 0.3
    got = fit_ridge(features, targets, reg_coeff=reg)
    for k in range(4):
        a = np.vstack([features[k].numpy(), np.sqrt(reg) * np.eye(7)])
        b = np.concatenate([targets[k].numpy(), np.zeros(7)])
        expected = np.linalg.lstsq(a, b, rcond=None)[0]
        np.testing.assert_allclose(got[k].numpy(), expected, rtol=1e-8, atol=1e-10)


def test_fit_ridge_survives_constant_zero_features() -> None:
    # A hidden goal is a block of zero observation entries: F^T F is singular without the ridge.
    features = torch.zeros(1, 20, 3, dtype=torch.float64)
    features[0, :, 0] = torch.arange(20.0)
    targets = 2.0 * features[0, :, 0].unsqueeze(0)
    weights = fit_ridge(features, targets)
    assert torch.isfinite(weights).all()
    assert abs(weights[0, 0].item() - 2.0) < 1e-6 and weights[0, 1:].abs().max() < 1e-9


def test_linear_baseline_recovers_returns_that_are_linear_in_the_features() -> None:
    # Rewards whose returns are exactly a linear function of [obs, obs^2, t, t^2, t^3, 1] per task:
    # the fitted values must reproduce the returns, separately for each task (own weights).
    K, E, T, D = 2, 3, 8, 2
    gen = torch.Generator().manual_seed(2)
    obs = torch.randn(K, E, T, D, generator=gen, dtype=torch.float64)
    truncated = torch.zeros(K, E, T, dtype=torch.bool)
    truncated[..., 3] = truncated[..., 7] = True  # two 4-step episodes per env
    terminated = torch.zeros_like(truncated)
    true_w = torch.randn(K, 2 * D + 4, generator=gen, dtype=torch.float64)
    feats = baseline_features(obs, episode_time_index(terminated, truncated))
    returns = torch.einsum("ketf,kf->ket", feats, true_w)
    gamma = 0.9
    # Invert the return recursion: r_t = G_t - gamma * G_{t+1} inside an episode, r = G at its end.
    following = torch.cat([returns[..., 1:], torch.zeros_like(returns[..., :1])], dim=-1)
    rewards = returns - gamma * torch.where(truncated, torch.zeros_like(returns), following)
    values, next_values = linear_baseline_values(obs, rewards, terminated, truncated, gamma, reg_coeff=1e-10)
    torch.testing.assert_close(values, returns, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(next_values, torch.where(truncated, torch.zeros_like(returns), following), rtol=1e-6, atol=1e-6)
