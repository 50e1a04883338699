"""Contract tests of the recurrent actor-critics (SSM and GRU).

Rollouts call ``forward`` with ``T == 1`` carrying the state; training recomputes the whole stored
sequence from the rollout's initial state. Both must agree, also under ``vmap`` over per-agent
parameters applied with ``functional_call`` (how the collector and MAML call policies).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, vmap

from metarl_lightning.policies import GRUActorCritic, SSMActorCritic
from metarl_lightning.policies.base import ActorCritic, PolicyOutput

TOL = {"atol": 1e-10, "rtol": 1e-9}
OBS, ACT = 5, 3

POLICIES = {
    "ssm": lambda: SSMActorCritic(OBS, ACT, hidden_dim=8, state_dim=6, num_layers=2),
    "ssm_shared": lambda: SSMActorCritic(OBS, ACT, hidden_dim=8, state_dim=6, num_layers=2, shared_trunk=True),
    "gru": lambda: GRUActorCritic(OBS, ACT, hidden_dim=8),
}


def make(kind: str) -> ActorCritic:
    torch.manual_seed(0)
    policy = POLICIES[kind]().double()
    if isinstance(policy, SSMActorCritic):
        with torch.no_grad():  # longer memory than the default init, so carried state matters
            for trunk in filter(None, (policy.actor_trunk, policy.critic_trunk)):
                for block in trunk.blocks:
                    block.ssm.log_step.uniform_(-2.0, 0.0)
    return policy


def episode_resets(batch: int, length: int) -> torch.Tensor:
    """Reset at t = 0 and one mid-sequence episode boundary per row, at a different step each."""
    resets = torch.zeros(batch, length, dtype=torch.bool)
    resets[:, 0] = True
    for b in range(batch):
        resets[b, (3 + 5 * b) % length] = True
    return resets


def step_by_step(policy: ActorCritic, obs: torch.Tensor, state: torch.Tensor, resets: torch.Tensor) -> PolicyOutput:
    outs = []
    for t in range(obs.shape[1]):
        out = policy(obs[:, t : t + 1], state, resets[:, t : t + 1])
        state = out.state
        outs.append(out)
    cat = lambda field: torch.cat([getattr(o, field) for o in outs], dim=1)  # noqa: E731
    return PolicyOutput(cat("mean"), cat("log_std"), cat("value"), state)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_shapes_and_initial_state(kind: str) -> None:
    policy = make(kind)
    state = policy.initial_state(4).double()
    out = policy(torch.randn(4, 6, OBS, dtype=torch.float64), state, episode_resets(4, 6))
    assert out.mean.shape == (4, 6, ACT) and out.value.shape == (4, 6)
    assert out.log_std.expand_as(out.mean).shape == out.mean.shape
    assert out.state.shape == state.shape and not out.state.is_complex()
    assert not state.any()


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_step_by_step_matches_sequence(kind: str) -> None:
    policy = make(kind)
    obs = torch.randn(3, 20, OBS, dtype=torch.float64)
    resets = episode_resets(3, 20)
    # A non-zero initial state (a rollout that continues an episode) with no reset at t = 0 for
    # one row, so the stored initial state is what the sequence path must start from.
    resets[2, 0] = False
    state0 = torch.randn_like(policy.initial_state(3).double())
    full = policy(obs, state0, resets)
    stepped = step_by_step(policy, obs, state0, resets)
    for a, b in zip(full, stepped):
        torch.testing.assert_close(a, b, **TOL)
    # The carried state matters (else the test above would be vacuous).
    no_reset = policy(obs, state0, torch.zeros_like(resets))
    assert not torch.allclose(no_reset.mean, full.mean)


@pytest.mark.parametrize("kind", sorted(POLICIES))
@pytest.mark.parametrize("length", [1, 9])
def test_vmap_over_agents_matches_loop(kind: str, length: int) -> None:
    policy = make(kind)
    agents, batch = 3, 2
    base = dict(policy.named_parameters())
    gen = torch.Generator().manual_seed(1)
    stacked = {
        n: p.detach() + 0.05 * torch.randn(agents, *p.shape, generator=gen, dtype=p.dtype) for n, p in base.items()
    }
    obs = torch.randn(agents, batch, length, OBS, dtype=torch.float64)
    state = torch.randn(agents, *policy.initial_state(batch).shape, dtype=torch.float64)
    resets = torch.rand(agents, batch, length, generator=gen) < 0.3

    def one(params, o, h, r):
        return functional_call(policy, params, (o, h, r))

    batched = vmap(one)(stacked, obs, state, resets)
    for k in range(agents):
        looped = one({n: p[k] for n, p in stacked.items()}, obs[k], state[k], resets[k])
        for a, b in zip(batched, looped):
            torch.testing.assert_close(a[k], b, **TOL)
    # Shared parameters expanded without a copy (stride 0 over agents, as maml.stack_for_agents
    # does for support rollouts) must work too.
    expanded = {n: p.detach().unsqueeze(0).expand(agents, *p.shape) for n, p in base.items()}
    shared = vmap(one)(expanded, obs, state, resets)
    for k in range(agents):
        for a, b in zip(shared, policy(obs[k], state[k], resets[k])):
            torch.testing.assert_close(a[k], b, **TOL)


@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_grad_through_vmapped_sequence(kind: str) -> None:
    """Per-agent gradients of the vmapped training path equal those of a per-agent loop."""
    policy = make(kind)
    stacked = {
        n: p.detach().unsqueeze(0).repeat(2, *[1] * p.dim()).requires_grad_() for n, p in policy.named_parameters()
    }
    obs = torch.randn(2, 2, 6, OBS, dtype=torch.float64)
    state = torch.zeros(2, *policy.initial_state(2).shape, dtype=torch.float64)
    resets = episode_resets(4, 6).reshape(2, 2, 6)
    out = vmap(lambda p, o, h, r: functional_call(policy, p, (o, h, r)))(stacked, obs, state, resets)
    grads = torch.autograd.grad((out.mean**2).sum() + out.value.sum() + out.log_std.sum(), list(stacked.values()))
    for k in range(2):
        single = {n: p[k].detach().requires_grad_() for n, p in stacked.items()}
        o = functional_call(policy, single, (obs[k], state[k], resets[k]))
        ref = torch.autograd.grad((o.mean**2).sum() + o.value.sum() + o.log_std.sum(), list(single.values()))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g[k], r, **TOL)


def test_ssm_parameter_groups_partition() -> None:
    policy = make("ssm")
    groups = policy.parameter_groups()
    names = {n for n, _ in policy.named_parameters()}
    assert set(groups) == {"ssm", "default"}
    assert set(groups["ssm"]) | set(groups["default"]) == names
    assert not set(groups["ssm"]) & set(groups["default"])
    suffixes = {n.rsplit(".", 1)[-1] for n in groups["ssm"]}
    assert suffixes == {"Lambda", "log_step", "B"}
    assert len(groups["ssm"]) == 3 * policy.num_layers * 2  # separate actor and critic trunks


@pytest.mark.parametrize("kind", [*sorted(POLICIES), "mlp"])
def test_forward_actor_is_forward_without_the_critic(kind: str) -> None:
    """``forward_actor`` (the inner step's and a critic-less outer loss's path) gives ``forward``'s
    action distribution and actor state, zeros for the value, through ``batched_policy_forward``
    too; with a separate critic trunk the critic's state is passed through untouched."""
    from metarl_lightning.policies import MLPActorCritic
    from metarl_lightning.policies.functional import batched_policy_forward

    if kind == "mlp":
        torch.manual_seed(0)
        policy: ActorCritic = MLPActorCritic(OBS, ACT, hidden_dim=8).double()
    else:
        policy = make(kind)
    obs = torch.randn(2, 7, OBS, dtype=torch.float64)
    resets = episode_resets(2, 7)
    state0 = torch.randn_like(policy.initial_state(2).double())
    full, actor = policy(obs, state0, resets), policy.forward_actor(obs, state0, resets)
    torch.testing.assert_close(actor.mean, full.mean, **TOL)
    torch.testing.assert_close(actor.log_std.expand_as(full.mean), full.log_std.expand_as(full.mean), **TOL)
    assert actor.value.shape == full.value.shape and not actor.value.any() and full.value.abs().sum() > 0
    separate = isinstance(policy, SSMActorCritic) and policy.critic_trunk is not None
    if separate:
        layers = policy.num_layers
        torch.testing.assert_close(actor.state[:, :layers], full.state[:, :layers], **TOL)
        assert torch.equal(actor.state[:, layers:], state0[:, layers:])
    else:
        torch.testing.assert_close(actor.state, full.state, **TOL)
    stacked = {n: p.detach().unsqueeze(0).expand(3, *p.shape) for n, p in policy.named_parameters()}
    batched = batched_policy_forward(policy, stacked, obs.expand(3, *obs.shape), state0.expand(3, *state0.shape), resets.expand(3, *resets.shape), actor_only=True)
    torch.testing.assert_close(batched.mean[1], full.mean, **TOL)
    assert not batched.value.any()
