"""GAE oracles: a plain Python loop, and a 3-step case worked out by hand."""

import random

import pytest
import torch

from metarl_lightning.algorithms.gae import generalized_advantage_estimate


def reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Textbook GAE, one scalar at a time."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        bootstrap = 0.0 if terminated[t] else next_values[t]
        delta = rewards[t] + gamma * bootstrap - values[t]
        running = delta + (0.0 if (terminated[t] or truncated[t]) else gamma * lam * running)
        advantages[t] = running
    return advantages


def test_hand_computed_three_steps_with_truncation():
    # Episode 1 is cut by the time limit after step 1 (bootstrapped from V(final obs) = 10),
    # episode 2 starts at step 2 and runs past the end of the rollout (bootstrap V = 4).
    gamma, lam = 0.5, 0.5
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([4.0, 5.0, 6.0])
    next_values = torch.tensor([5.0, 10.0, 4.0])
    terminated = torch.tensor([False, False, False])
    truncated = torch.tensor([False, True, False])
    adv, ret = generalized_advantage_estimate(rewards, values, next_values, terminated, truncated, gamma, lam)
    # delta_2 = 3 + 0.5*4 - 6 = -1            A_2 = -1
    # delta_1 = 2 + 0.5*10 - 5 = 2            A_1 = 2 (no carry across the truncation)
    # delta_0 = 1 + 0.5*5 - 4 = -0.5          A_0 = -0.5 + 0.25*2 = 0
    assert adv.tolist() == pytest.approx([0.0, 2.0, -1.0])
    assert ret.tolist() == pytest.approx([4.0, 7.0, 5.0])


def test_termination_does_not_bootstrap_but_truncation_does():
    rewards, values = torch.tensor([1.0]), torch.tensor([0.0])
    next_values = torch.tensor([100.0])
    term, _ = generalized_advantage_estimate(rewards, values, next_values, torch.tensor([True]), torch.tensor([False]), 0.9, 0.95)
    trunc, _ = generalized_advantage_estimate(rewards, values, next_values, torch.tensor([False]), torch.tensor([True]), 0.9, 0.95)
    assert term.item() == pytest.approx(1.0)
    assert trunc.item() == pytest.approx(1.0 + 0.9 * 100.0)


@pytest.mark.parametrize("length", [1, 7, 64])
def test_matches_python_loop_on_random_batches(length):
    rng = random.Random(length)
    gamma, lam = 0.97, 0.9
    batch = [
        [
            [rng.gauss(0, 1) for _ in range(length)],
            [rng.gauss(0, 1) for _ in range(length)],
            [rng.gauss(0, 1) for _ in range(length)],
            [rng.random() < 0.1 for _ in range(length)],
            [rng.random() < 0.1 for _ in range(length)],
        ]
        for _ in range(5)
    ]
    tensors = [torch.tensor([row[i] for row in batch], dtype=torch.float64 if i < 3 else torch.bool) for i in range(5)]
    adv, ret = generalized_advantage_estimate(*tensors, gamma, lam)
    for b, row in enumerate(batch):
        expected = reference_gae(*row, gamma, lam)
        assert adv[b].tolist() == pytest.approx(expected, abs=1e-12)
        assert (ret[b] - tensors[1][b]).tolist() == pytest.approx(expected, abs=1e-12)
