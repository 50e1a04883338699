"""S5-style diagonal state-space layer: parallel scan for training, O(1) step for rollouts.

Smith et al. 2023 (S5) with the episode-reset scan of Lu et al. 2023 (S5 for in-context RL). The
continuous system ``x' = Lambda x + B u``, ``y = C x + D u`` has a complex diagonal ``Lambda`` whose
real part is negative by construction (``Re = -exp(.)``), so every discretisation is stable. The
state is kept for one member of each conjugate pair only; the other member is its conjugate, so the
output is ``2 Re(C x) + D u`` and the real-valued system is preserved with half the state.

Discretisation is zero-order hold with a learnable per-mode log step size::

    Lambda_bar = exp(Lambda * dt),    B_bar = (Lambda_bar - 1) / Lambda * B

The sequence recurrence ``x_t = a_t x_{t-1} + B_bar u_t`` with ``a_t = Lambda_bar * (1 - reset_t)``
is associative in ``(a, b)`` pairs, so :func:`parallel_scan` evaluates it in ``O(log T)`` depth and
``O(T)`` work with plain torch ops (vmap-compatible and twice differentiable, as MAML needs).

The recurrent state leaves the layer as a real tensor ``(B, N, 2)`` (real and imaginary parts in the
last dim) so collectors can store it like any other float tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _mul_keep(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x * keep`` where ``keep`` is an optional real 0/1 mask; ``None`` means all ones."""
    return x if keep is None else x * keep


def parallel_scan(
    lam_bar: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """All prefix states of ``x_t = lam_bar * keep_t * x_{t-1} + b_t`` with ``x_{-1} = 0``.

    A recursive (Blelloch-style) even/odd scan: neighbouring steps are combined pairwise with the
    associative operator ``(a1, b1) o (a2, b2) = (a2 a1, a2 b1 + b2)``, the half-length problem is
    solved recursively, and the even positions are filled in from it. ``a_t`` is never
    materialised: a segment of ``2^k`` steps has ``a = lam_bar^(2^k) * prod(keep)``, so only the
    per-mode power (``(N,)``) and the per-step real mask (``(..., T, 1)``) are carried; that keeps
    the memory traffic to the ``b`` tensor alone. All ops are out of place.

    Args:
        lam_bar: discrete state matrix diagonal, ``(N,)`` complex.
        b: inputs ``B_bar u_t`` (with any initial state already folded into step 0),
            ``(..., T, N)`` complex.
        keep: ``1 - reset`` as a real mask ``(..., T, 1)``, or ``None`` when nothing resets.

    Returns:
        States ``x_t`` for every step, ``(..., T, N)``.
    """
    length = b.shape[-2]
    if length == 1:
        return b
    if length % 2:
        # Pad one trailing step; padding at the end cannot affect earlier prefixes.
        b = torch.cat([b, torch.zeros_like(b[..., :1, :])], dim=-2)
        if keep is not None:
            keep = torch.cat([keep, torch.ones_like(keep[..., :1, :])], dim=-2)
    half = b.shape[-2] // 2
    # unbind, not indexing: its backward stacks instead of zero-filling full-size grads.
    b_even, b_odd = b.unflatten(-2, (half, 2)).unbind(-2)  # (..., T/2, N) each
    if keep is None:
        k_even = k_odd = k_pair = None
    else:
        k_even, k_odd = keep.unflatten(-2, (half, 2)).unbind(-2)  # (..., T/2, 1) each
        k_pair = k_even * k_odd
    # Combined segment (even, odd): a = a_odd a_even, b = a_odd b_even + b_odd.
    b_comb = lam_bar * _mul_keep(b_even, k_odd) + b_odd  # (..., T/2, N)
    x_odd = parallel_scan(lam_bar * lam_bar, b_comb, k_pair)  # (..., T/2, N)
    # Even step j continues from the odd prefix j - 1 (zero before the start).
    x_prev = torch.cat([torch.zeros_like(x_odd[..., :1, :]), x_odd[..., :-1, :]], dim=-2)
    x_even = lam_bar * _mul_keep(x_prev, k_even) + b_even  # (..., T/2, N)
    x = torch.stack([x_even, x_odd], dim=-2).flatten(-3, -2)  # (..., T', N)
    return x[..., :length, :]


def sequential_scan(
    lam_bar: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference loop for :func:`parallel_scan` (same contract); the oracle in tests and benchmarks."""
    # unbind (not b[..., t, :]) so backward stacks the step grads instead of building T
    # full-size zero tensors; this keeps the reference an honest baseline for benchmarks.
    b_steps = b.unbind(-2)  # T x (..., N)
    a_steps = [lam_bar] * len(b_steps) if keep is None else (lam_bar * keep).unbind(-2)
    x = torch.zeros_like(b_steps[0])  # (..., N)
    states = []
    for a_t, b_t in zip(a_steps, b_steps):
        x = a_t * x + b_t
        states.append(x)
    return torch.stack(states, dim=-2)  # (..., T, N)


def to_complex(state: torch.Tensor) -> torch.Tensor:
    """``(..., N, 2)`` real/imag float -> ``(..., N)`` complex (a view when the layout allows)."""
    try:
        # A view needs stride 1 on the last dim and even strides elsewhere, which any slice along
        # the leading dims of a contiguous state has; copying every step would cost a kernel call.
        return torch.view_as_complex(state)
    except RuntimeError:
        return torch.view_as_complex(state.contiguous())


def to_real(state: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` complex -> ``(..., N, 2)`` real/imag float (a view)."""
    return torch.view_as_real(state)


def discretize(Lambda: torch.Tensor, log_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for :class:`S5`'s parameterisation (any leading dims, e.g. per agent).

    Args:
        Lambda: ``(..., N, 2)``: ``log(-Re Lambda)`` and ``Im Lambda``.
        log_step: ``(..., N)`` log step sizes.

    Returns:
        ``lam_bar = exp(Lambda dt)`` and ``input_scale = (lam_bar - 1) / Lambda``, ``(..., N)``
        complex; ``B_bar = diag(input_scale) B``.
    """
    lam = torch.complex(-torch.exp(Lambda[..., 0]), Lambda[..., 1])  # (..., N)
    lam_bar = torch.exp(lam * torch.exp(log_step))  # (..., N)
    return lam_bar, (lam_bar - 1.0) / lam


class S5(nn.Module):
    """Diagonal complex SSM layer mapping ``(B, T, H)`` to ``(B, T, H)``.

    Args:
        d_model: channels ``H`` of input and output.
        state_dim: state size ``P`` of the real system; ``P / 2`` complex modes are stored (the
            other half are their conjugates). Must be even.
        dt_min: smallest initial step size.
        dt_max: largest initial step size (log-uniform in between, as S4/S5).
        scan: ``"parallel"`` (log-depth) or ``"sequential"`` (reference loop; for benchmarks).

    Attributes (the ``ssm`` optimiser group is ``Lambda``, ``log_step``, ``B``; S5 trains these
    with its own learning rate and no weight decay):
        Lambda: ``(N, 2)``: ``log(-Re Lambda)`` and ``Im Lambda``; ``Re = -exp(.) < 0`` always.
        log_step: ``(N,)``, log of the ZOH step size per mode.
        B: ``(H, N, 2)``, complex ``B^T`` as real/imag; laid out so that ``u @ B.reshape(H, 2N)``
            is ``B u`` in real/imag pairs (one real matmul, no complex cast of the input).
        C: ``(N, 2, H)``, the output map in real form: ``y = [Re x, Im x] @ C + D u``. It equals
            ``2 Re(C' x)`` (conjugate symmetry) for ``C' = (C[:, 0] - i C[:, 1]).T / 2``; storing
            the real form saves the complex-to-real conversion on every call.
        D: ``(H,)`` real feed-through.
    """

    ssm_parameter_names = ("Lambda", "log_step", "B")

    def __init__(
        self,
        d_model: int,
        state_dim: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan: str = "parallel",
    ) -> None:
        super().__init__()
        if state_dim % 2:
            raise ValueError(f"state_dim must be even (conjugate pairs), got {state_dim}")
        if scan not in ("parallel", "sequential"):
            raise ValueError(f"scan must be 'parallel' or 'sequential', got {scan!r}")
        self.d_model = d_model
        self.num_modes = n = state_dim // 2
        self.scan = scan
        # S4D-Lin initialisation: Lambda_n = -1/2 + i pi n (a diagonal approximation of HiPPO-LegS
        # that covers a range of frequencies).
        lam = torch.stack([torch.full((n,), math.log(0.5)), math.pi * torch.arange(n, dtype=torch.float32)], -1)
        self.Lambda = nn.Parameter(lam)
        log_dt = torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_step = nn.Parameter(log_dt)
        # Variance-preserving for a complex matmul: re and im each carry half the variance.
        self.B = nn.Parameter(torch.randn(d_model, n, 2) / math.sqrt(2 * d_model))
        self.C = nn.Parameter(torch.randn(n, 2, d_model) / math.sqrt(2 * n))
        self.D = nn.Parameter(torch.randn(d_model))

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ZOH discretisation: ``B_bar = diag(input_scale) B``.

        Returns:
            ``lam_bar`` ``(N,)`` complex and ``input_scale = (lam_bar - 1) / Lambda`` ``(N,)`` complex.
        """
        return discretize(self.Lambda, self.log_step)

    def _input(self, u: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        """``B_bar u`` for real ``u`` ``(..., H)`` -> complex ``(..., N)``.

        Scaling ``B u`` per mode instead of forming ``B_bar`` saves an ``(H, N)`` complex product
        and a copy on every call (it matters in the O(1) rollout step, which runs once per env step).
        """
        bu = (u @ self.B.reshape(self.d_model, 2 * self.num_modes)).unflatten(-1, (self.num_modes, 2))
        return input_scale * to_complex(bu)

    def _output(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``y = [Re x, Im x] @ C + D u`` for complex ``x`` ``(..., N)`` and ``u`` ``(..., H)``."""
        c = self.C.reshape(2 * self.num_modes, self.d_model)  # (2N, H)
        return torch.addcmul(to_real(x).flatten(-2) @ c, self.D, u)  # (..., H)

    def forward(
        self,
        u: torch.Tensor,
        h0: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run over a whole sequence (possibly spanning several episodes).

        Args:
            u: inputs, ``(B, T, H)``.
            h0: state before step 0, ``(B, N, 2)`` real/imag; ``None`` means zeros.
            resets: ``(B, T)`` bool; ``resets[b, t]`` zeroes the state before step ``t``.

        Returns:
            ``y`` ``(B, T, H)`` and the state after the last step ``(B, N, 2)``.
        """
        lam_bar, input_scale = self.discretize()
        b = self._input(u, input_scale)  # (B, T, N)
        keep = None if resets is None else (~resets).to(u.dtype).unsqueeze(-1)  # (B, T, 1)
        if h0 is not None:
            # Fold the initial state into step 0: x_0 = a_0 h0 + b_0.
            carried = lam_bar * _mul_keep(to_complex(h0), None if keep is None else keep[:, 0])
            b = torch.cat([(b[:, 0] + carried).unsqueeze(1), b[:, 1:]], dim=1)  # (B, T, N)
        scan = parallel_scan if self.scan == "parallel" else sequential_scan
        x = scan(lam_bar, b, keep)  # (B, T, N)
        return self._output(x, u), to_real(x[:, -1])

    def step(self, u_t: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrent step (rollouts); reset by passing a zeroed ``h``.

        Args:
            u_t: input, ``(B, H)``.
            h: state, ``(B, N, 2)`` real/imag.

        Returns:
            ``y_t`` ``(B, H)`` and the next state ``(B, N, 2)``.
        """
        lam_bar, input_scale = self.discretize()
        b_t = self._input(u_t, input_scale)  # (B, N)
        x = torch.addcmul(b_t, lam_bar, to_complex(h))  # (B, N)
        return self._output(x, u_t), to_real(x)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Zero state ``(batch_size, N, 2)``."""
        return torch.zeros(batch_size, self.num_modes, 2, device=device, dtype=self.B.dtype)
