"""Native acting steps (per-rollout folded parameters, batched matmuls) == the policy's ``forward``."""

import pytest
import torch

from metarl_lightning.policies import GRUActorCritic, MLPActorCritic, SSMActorCritic
from metarl_lightning.policies.acting import GenericActingStep
from metarl_lightning.policies.mlp import MLPActingStep
from metarl_lightning.policies.ssm_acting import SSMActingStep

K, E, D, A = 3, 4, 5, 2

POLICIES = {
    "mlp": lambda: MLPActorCritic(D, A, hidden_dim=16),
    "mlp-1-layer": lambda: MLPActorCritic(D, A, hidden_dim=16, num_layers=1),
    "ssm": lambda: SSMActorCritic(D, A, hidden_dim=16, state_dim=8),
    "ssm-shared-trunk": lambda: SSMActorCritic(D, A, hidden_dim=16, state_dim=8, shared_trunk=True),
    "ssm-3-layers": lambda: SSMActorCritic(D, A, hidden_dim=16, state_dim=8, num_layers=3),
    "ssm-state-dependent-std": lambda: SSMActorCritic(D, A, hidden_dim=16, state_dim=8, state_dependent_std=True),
    "ssm-shared-trunk-state-dependent-std": lambda: SSMActorCritic(
        D, A, hidden_dim=16, state_dim=8, shared_trunk=True, state_dependent_std=True
    ),
}


def perturbed(policy: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value (LayerNorm affines start at 1 / 0, heads near 0)."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return policy


@pytest.mark.parametrize("per_agent", [True, False], ids=["per-agent", "theta"])
@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_native_step_equals_forward_over_a_rollout_with_resets(kind, per_agent):
    torch.manual_seed(0)
    policy = perturbed(POLICIES[kind]()).double()
    params = None
    if per_agent:  # genuinely different parameters per agent
        params = {n: p.detach() + 0.1 * torch.randn(K, *p.shape, dtype=p.dtype) for n, p in policy.named_parameters()}
    native, generic = policy.acting_step(params, K, E), GenericActingStep(policy, params, K, E)
    assert not isinstance(native, GenericActingStep)
    native_state, generic_state = native.initial_state(), generic.initial_state()
    with torch.no_grad():
        for t in range(15):
            obs = torch.randn(K, E, D, dtype=torch.float64)
            reset = torch.rand(K, E) < 0.25 if t else torch.ones(K, E, dtype=torch.bool)
            a, b = native(obs, native_state, reset), generic(obs, generic_state, reset)
            torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(a.value, b.value, rtol=0, atol=1e-12)
            torch.testing.assert_close(a.log_std.expand_as(a.mean), b.log_std, rtol=0, atol=1e-12)
            native_state, generic_state = a.state, b.state


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_acting_without_values_skips_the_critic_and_acts_the_same(kind):
    torch.manual_seed(0)
    policy = perturbed(POLICIES[kind]())
    params = {n: p.detach() + 0.1 * torch.randn(K, *p.shape) for n, p in policy.named_parameters()}
    full, actor_only = policy.acting_step(params, K, E), policy.acting_step(params, K, E, with_values=False)
    full_state, actor_state = full.initial_state(), actor_only.initial_state()
    with torch.no_grad():
        for t in range(6):
            obs, reset = torch.randn(K, E, D), torch.rand(K, E) < 0.3
            a, b = full(obs, full_state, reset), actor_only(obs, actor_state, reset)
            assert b.value is None and a.value.shape == (K, E)
            torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-6)
            full_state, actor_state = a.state, b.state


def test_reset_zeroes_only_the_flagged_envs_state():
    torch.manual_seed(0)
    policy = perturbed(SSMActorCritic(D, A, hidden_dim=16, state_dim=8))
    step = policy.acting_step(None, K, E)
    obs = torch.randn(K, E, D)
    with torch.no_grad():
        warm = step.initial_state()
        for _ in range(5):
            warm = step(obs, warm, torch.zeros(K, E, dtype=torch.bool)).state
        reset = torch.zeros(K, E, dtype=torch.bool)
        reset[1, 2] = True
        after_reset = step(obs, warm, reset)
        fresh = step(obs, step.initial_state(), torch.zeros(K, E, dtype=torch.bool))
        carried = step(obs, warm, torch.zeros(K, E, dtype=torch.bool))
    assert torch.allclose(after_reset.mean[1, 2], fresh.mean[1, 2], atol=1e-6)
    assert not torch.allclose(after_reset.mean[1, 2], carried.mean[1, 2], atol=1e-4)
    others = ~reset
    assert torch.allclose(after_reset.mean[others], carried.mean[others], atol=1e-6)


def test_policies_without_a_native_step_use_the_generic_one():
    assert isinstance(GRUActorCritic(D, A).acting_step(None, K, E), GenericActingStep)
    assert isinstance(MLPActorCritic(D, A).acting_step(None, K, E), MLPActingStep)
    assert isinstance(SSMActorCritic(D, A).acting_step(None, K, E), SSMActingStep)


@pytest.mark.parametrize("kind", sorted(POLICIES) + ["gru"])
def test_values_alone_equal_the_full_forward(kind):
    torch.manual_seed(0)
    policy = perturbed(GRUActorCritic(D, A) if kind == "gru" else POLICIES[kind]())
    obs, resets = torch.randn(4, 9, D), torch.rand(4, 9) < 0.2
    state = policy.initial_state(4)
    torch.testing.assert_close(policy.values(obs, state, resets), policy(obs, state, resets).value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ssm", "gru"])
def test_state_dependent_std_starts_at_the_base_std_and_then_varies_with_the_memory(kind):
    torch.manual_seed(0)
    if kind == "gru":
        policy = GRUActorCritic(D, A, hidden_dim=16, init_log_std=-0.3, state_dependent_std=True)
    else:
        policy = SSMActorCritic(D, A, hidden_dim=16, state_dim=8, init_log_std=-0.3, state_dependent_std=True)
    obs, resets = torch.randn(2, 7, D), torch.zeros(2, 7, dtype=torch.bool)
    out = policy(obs, policy.initial_state(2), resets)
    torch.testing.assert_close(out.log_std, torch.full((2, 7, A), -0.3))  # zero-initialised head
    assert {"log_std_head.weight", "log_std_head.bias", "log_std"} <= set(policy.action_head_names())
    out = perturbed(policy)(obs, policy.initial_state(2), resets)
    assert out.log_std.std(dim=1).min() > 0, "the std does not depend on the step"
    assert (out.log_std - policy.log_std).abs().max() <= 2.0  # bounded around the base


@pytest.mark.parametrize("per_agent", [True, False], ids=["per-agent", "theta"])
@pytest.mark.parametrize("kind", sorted(POLICIES) + ["gru"])
def test_select_state_takes_each_envs_state_from_the_flagged_source(kind, per_agent):
    # Oracle: a step from the selected state acts, env by env, as a step from the state it was taken from.
    torch.manual_seed(0)
    policy = perturbed(GRUActorCritic(D, A, hidden_dim=16) if kind == "gru" else POLICIES[kind]()).double()
    params = None
    if per_agent:
        params = {n: p.detach() + 0.1 * torch.randn(K, *p.shape, dtype=p.dtype) for n, p in policy.named_parameters()}
    step = policy.acting_step(params, K, E)
    no_reset = torch.zeros(K, E, dtype=torch.bool)
    with torch.no_grad():
        first, second = step.initial_state(), step.initial_state()
        for _ in range(4):  # two different histories
            first = step(torch.randn(K, E, D, dtype=torch.float64), first, no_reset).state
            second = step(torch.randn(K, E, D, dtype=torch.float64), second, no_reset).state
        mask = torch.rand(K, E) < 0.5
        mask[0, 0], mask[-1, -1] = True, False
        obs = torch.randn(K, E, D, dtype=torch.float64)
        selected = step(obs, step.select_state(mask, first, second), no_reset).mean
        from_first, from_second = step(obs, first, no_reset).mean, step(obs, second, no_reset).mean
    torch.testing.assert_close(selected[mask], from_first[mask], rtol=0, atol=1e-12)
    torch.testing.assert_close(selected[~mask], from_second[~mask], rtol=0, atol=1e-12)
    if kind != "mlp" and kind != "mlp-1-layer":  # the histories differ where there is memory
        assert not torch.allclose(from_first, from_second, atol=1e-6)
