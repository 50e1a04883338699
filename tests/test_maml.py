"""MAML meta-gradient oracles in float64: finite differences and the first-order definition."""

import pytest
import torch
from torch.func import functional_call

from metarl_lightning.algorithms.maml import inner_update, stack_for_agents



@pytest.fixture(autouse=True)
def float64():
    """Finite differences need float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def tiny_policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def make_losses(model: torch.nn.Module):
    g = torch.Generator().manual_seed(1)
    x_support, y_support = torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 2, generator=g)
    x_query, y_query = torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 2, generator=g)

    def per_agent(params, x, y):
        # params stacked [K, ...]: run each agent's parameters on its own data
        losses = [
            (functional_call(model, {k: v[i] for k, v in params.items()}, (x[i],)) - y[i]).pow(2).mean()
            for i in range(x.shape[0])
        ]
        return torch.stack(losses)

    inner = lambda p: per_agent(p, x_support, y_support).sum()
    outer = lambda p: per_agent(p, x_query, y_query).mean()
    return inner, outer


def meta_objective(model, params, inner, outer, steps, lr):
    adapted = inner_update(stack_for_agents(params, 2), inner, lr, steps, first_order=False)
    return outer(adapted)


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    model = tiny_policy()
    inner, outer = make_losses(model)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    loss = meta_objective(model, params, inner, outer, steps, lr=0.3)
    grads = torch.autograd.grad(loss, tuple(params.values()))
    eps = 1e-6
    for (name, p), g in zip(params.items(), grads):
        flat = p.detach().reshape(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            def at(delta):
                shifted = {k: v.detach().clone() for k, v in params.items()}
                shifted[name].view(-1)[i] += delta
                shifted = {k: v.requires_grad_(True) for k, v in shifted.items()}
                return meta_objective(model, shifted, inner, outer, steps, lr=0.3).item()

            numeric = (at(eps) - at(-eps)) / (2 * eps)
            assert g.reshape(-1)[i].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, i)


def test_first_order_gives_outer_gradient_at_adapted_parameters():
    model = tiny_policy()
    inner, outer = make_losses(model)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    adapted = inner_update(stack_for_agents(params, 2), inner, 0.3, 1, first_order=True)
    fo_grads = torch.autograd.grad(outer(adapted), tuple(params.values()))

    # FOMAML by definition: sum over agents of grad_outer evaluated at each agent's theta_k'.
    fixed = {k: v.detach().clone().requires_grad_(True) for k, v in adapted.items()}
    at_adapted = torch.autograd.grad(outer(fixed), tuple(fixed.values()))
    for g, g_adapted in zip(fo_grads, at_adapted):
        assert torch.allclose(g, g_adapted.sum(0), atol=1e-12)

    so_loss = meta_objective(model, params, inner, outer, 1, 0.3)
    so_grads = torch.autograd.grad(so_loss, tuple(params.values()))
    difference = max((a - b).abs().max().item() for a, b in zip(fo_grads, so_grads))
    assert difference > 1e-4, "second-order terms must change the gradient"


def test_per_agent_gradients_are_independent():
    model = tiny_policy()
    inner, _ = make_losses(model)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    adapted = inner_update(stack_for_agents(params, 2), inner, 0.3, 1, first_order=True)
    # By hand: theta_k' = theta - lr * grad of agent k's own loss (the other agent held fixed).
    for k in range(2):
        def own_loss(p, k=k):
            other = {n: v.detach() for n, v in params.items()}
            stacked = {n: torch.stack([p[n], other[n]] if k == 0 else [other[n], p[n]]) for n in p}
            return inner(stacked)

        own = torch.autograd.grad(own_loss(params), tuple(params.values()))
        for (name, p), g in zip(params.items(), own):
            assert torch.allclose(adapted[name][k], p - 0.3 * g, atol=1e-12)


def test_zero_steps_is_identity_and_negative_is_rejected():
    model = tiny_policy()
    params = dict(model.named_parameters())
    assert inner_update(params, lambda p: torch.zeros(()), 0.1, 0, False) is params
    with pytest.raises(ValueError, match="inner_steps"):
        inner_update(params, lambda p: torch.zeros(()), 0.1, -1, False)


@pytest.mark.parametrize("first_order", [False, True])
def test_learned_step_sizes_get_the_meta_gradient_of_their_definition(first_order):
    # Meta-SGD: theta' = theta - alpha * g with alpha per element; d outer / d alpha by finite
    # differences of the whole meta-objective (second order), and -g * grad outer(theta') (first order).
    model = tiny_policy()
    inner, outer = make_losses(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    alphas = {k: (0.1 + 0.4 * torch.rand(v.shape, generator=gen)).requires_grad_(True) for k, v in params.items()}

    def objective(step_sizes):
        theta = stack_for_agents({k: v.clone().requires_grad_(True) for k, v in params.items()}, 2)
        return outer(inner_update(theta, inner, step_sizes, 1, first_order=first_order))

    grads = torch.autograd.grad(objective(alphas), tuple(alphas.values()))
    eps = 1e-6
    for (name, alpha), g in zip(alphas.items(), grads):
        for i in range(0, alpha.numel(), max(1, alpha.numel() // 4)):
            def at(delta):
                shifted = {k: v.detach().clone() for k, v in alphas.items()}
                shifted[name].view(-1)[i] += delta
                return objective(shifted).item()

            numeric = (at(eps) - at(-eps)) / (2 * eps)
            # First order: the inner gradient is a constant, which is exactly what the finite
            # difference in alpha sees too (alpha does not enter g), so both orders match it.
            assert g.reshape(-1)[i].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, i)


def test_a_uniform_step_size_dict_equals_the_float_step():
    model = tiny_policy()
    inner, _ = make_losses(model)
    theta = stack_for_agents({k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}, 2)
    by_float = inner_update(theta, inner, 0.3, 2, first_order=False)
    by_dict = inner_update(theta, inner, {k: torch.full(v.shape[1:], 0.3) for k, v in theta.items()}, 2, first_order=False)
    for name in by_float:
        torch.testing.assert_close(by_dict[name], by_float[name])
