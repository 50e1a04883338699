"""Oracle tests of the S5 layer: the parallel scan against the sequential loop and the step path.

Everything runs in float64 so that the only difference between the paths is the order of the
floating-point operations (tolerances near 1e-10, not float32 noise).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metarl_lightning.algorithms.maml import inner_update
from metarl_lightning.policies.ssm import S5, parallel_scan, sequential_scan
from metarl_lightning.policies.ssm_actor_critic import SSMActorCritic

TOL = {"atol": 1e-10, "rtol": 1e-9}


def make_layer(d_model: int = 4, state_dim: int = 8, seed: int = 0) -> S5:
    torch.manual_seed(seed)
    layer = S5(d_model, state_dim).double()
    # Larger steps than the default init so states carry information over many steps and the
    # scan is exercised with non-trivial powers of Lambda_bar.
    with torch.no_grad():
        layer.log_step.uniform_(-3.0, 0.0)
    return layer


def random_resets(batch: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=gen) < 0.1


def run_with_grads(layer: S5, scan: str, u: torch.Tensor, h0, resets) -> tuple[torch.Tensor, ...]:
    """Outputs, final state, and gradients of a fixed random functional wrt inputs and params."""
    layer.scan = scan
    inputs = [u] + ([h0] if h0 is not None else [])
    y, h = layer(u, h0, resets)
    gen = torch.Generator().manual_seed(123)
    w_y = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    w_h = torch.randn(h.shape, generator=gen, dtype=h.dtype)
    loss = (w_y * y).sum() + (w_h * h).sum() + (y**2).mean()
    grads = torch.autograd.grad(loss, inputs + list(layer.parameters()))
    return (y.detach(), h.detach(), *grads)


@pytest.mark.parametrize("length", [1, 7, 64, 500])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_scan_matches_sequential_loop(length: int, with_h0: bool, with_resets: bool) -> None:
    layer = make_layer()
    batch = 3
    u = torch.randn(batch, length, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(batch, 4, 2, dtype=torch.float64, requires_grad=True) if with_h0 else None
    resets = random_resets(batch, length, seed=length) if with_resets else None
    fast = run_with_grads(layer, "parallel", u, h0, resets)
    slow = run_with_grads(layer, "sequential", u, h0, resets)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, **TOL)


def test_scan_function_matches_loop_with_batch_dims() -> None:
    """The bare scan on extra leading dims (as under vmap) and odd lengths at every level."""
    torch.manual_seed(1)
    lam = torch.exp(torch.complex(-torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)))
    b = torch.randn(2, 3, 37, 5, dtype=torch.complex128)
    keep = (torch.rand(2, 3, 37, 1) > 0.2).double()
    torch.testing.assert_close(parallel_scan(lam, b, keep), sequential_scan(lam, b, keep), **TOL)
    torch.testing.assert_close(parallel_scan(lam, b), sequential_scan(lam, b), **TOL)


def test_step_loop_matches_forward() -> None:
    layer = make_layer()
    u = torch.randn(2, 33, 4, dtype=torch.float64)
    h0 = torch.randn(2, 4, 2, dtype=torch.float64)
    y, h_last = layer(u, h0)
    h, ys = h0, []
    for t in range(u.shape[1]):
        y_t, h = layer.step(u[:, t], h)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, **TOL)
    torch.testing.assert_close(h, h_last, **TOL)


@pytest.mark.parametrize("k", [1, 10, 31])
def test_reset_splits_into_independent_sequences(k: int) -> None:
    layer = make_layer()
    u = torch.randn(2, 32, 4, dtype=torch.float64)
    h0 = torch.randn(2, 4, 2, dtype=torch.float64)
    resets = torch.zeros(2, 32, dtype=torch.bool)
    resets[:, k] = True
    y, h = layer(u, h0, resets)
    y_first, _ = layer(u[:, :k], h0)
    y_second, h_second = layer(u[:, k:], None)
    torch.testing.assert_close(y, torch.cat([y_first, y_second], 1), **TOL)
    torch.testing.assert_close(h, h_second, **TOL)


def test_state_is_stable_and_real() -> None:
    layer = make_layer()
    lam_bar, _ = layer.discretize()
    assert (lam_bar.abs() < 1).all()
    h = layer.initial_state(3)
    assert h.shape == (3, 4, 2) and not h.is_complex()


def test_gradgradcheck_tiny_layer() -> None:
    layer = make_layer(d_model=2, state_dim=4, seed=3)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    u = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    resets = torch.tensor([[False, False, True, False, False]])

    def fn(u: torch.Tensor, h0: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return functional_call(layer, dict(zip(names, flat)), (u, h0, resets))

    assert torch.autograd.gradcheck(fn, (u, h0, *params))
    assert torch.autograd.gradgradcheck(fn, (u, h0, *params))


def test_maml_inner_update_through_ssm_policy_matches_finite_differences() -> None:
    """Second-order meta-gradient through the scan == central differences of the outer loss."""
    torch.manual_seed(0)
    policy = SSMActorCritic(3, 2, hidden_dim=4, state_dim=4, num_layers=2).double()
    with torch.no_grad():
        for block in [*policy.actor_trunk.blocks, *policy.critic_trunk.blocks]:
            block.ssm.log_step.uniform_(-2.0, 0.0)
    theta = {name: p.detach().clone().requires_grad_() for name, p in policy.named_parameters()}
    obs = torch.randn(2, 9, 3, dtype=torch.float64)
    resets = torch.zeros(2, 9, dtype=torch.bool)
    resets[:, 0] = resets[1, 4] = True
    state = policy.initial_state(2).double()
    target = torch.randn(2, 9, 2, dtype=torch.float64)

    def loss_fn(params: dict[str, torch.Tensor], support: bool) -> torch.Tensor:
        out = functional_call(policy, params, (obs, state, resets))
        sl = slice(0, 5) if support else slice(5, 9)  # different data for inner and outer loss
        err = (out.mean - target)[:, sl]
        return (err**2 * torch.exp(-2 * out.log_std[:, sl])).mean() + (out.value[:, sl] ** 2).mean()

    def outer(params: dict[str, torch.Tensor], first_order: bool = False) -> torch.Tensor:
        adapted = inner_update(params, lambda p: loss_fn(p, True), 0.1, 2, first_order)
        return loss_fn(adapted, False)

    grads = torch.autograd.grad(outer(theta), list(theta.values()))
    direction = {n: torch.randn_like(p) for n, p in theta.items()}
    analytic = sum((g * direction[n]).sum() for n, g in zip(theta, grads))
    eps = 1e-6
    with torch.enable_grad():
        plus = outer({n: (p + eps * direction[n]).detach().requires_grad_() for n, p in theta.items()})
        minus = outer({n: (p - eps * direction[n]).detach().requires_grad_() for n, p in theta.items()})
    numeric = (plus - minus) / (2 * eps)
    torch.testing.assert_close(analytic, numeric.detach(), atol=1e-7, rtol=1e-6)
    # The second-order terms are real here: first-order MAML gives a different directional derivative.
    fo = torch.autograd.grad(outer(theta, first_order=True), list(theta.values()))
    fo_dir = sum((g * direction[n]).sum() for n, g in zip(theta, fo))
    assert (fo_dir - analytic).abs() > 1e-6
