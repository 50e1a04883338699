"""A decaying ceiling on a Gaussian policy's state-independent standard deviation.

The outer update moves the log-std by at most about ``meta_lr`` per Adam step, and the MAML
objective pushes it *up* (docs/results.md: the entropy rose under PPO and TRPO alike), so a policy
that starts at std 1 ends a reference-budget run at std ~1. Meta-World's protocol scores the *mean*
action, which such a policy has never had to make good on its own. A ceiling that falls
geometrically from 1 to ``final_std`` over the first ``epochs`` meta-iterations, applied as a
projection of the meta-parameter before every meta-iteration's rollouts (projected gradient
descent on the box ``log_std <= log(ceiling)``), anneals exploration the way a std schedule does
in plain RL. The inner step still adapts the log-std from the projected value. The module can
instead bound only the adapted policy's log-std (``std_ceiling_on: adapted``, a clamp after the
inner step): explore with theta, exploit with theta_k'.
"""

from __future__ import annotations

import math

import torch


def std_ceiling(epoch: int, final_std: float, epochs: int) -> float:
    """The ceiling on the std in meta-iteration ``epoch`` (0-based).

    Geometric from 1 at epoch 0 to ``final_std`` at ``epochs`` and after: ``final_std ** (min(epoch,
    epochs) / epochs)``. A pure function of the epoch, so a resumed run projects exactly as the
    uninterrupted one.

    Args:
        epoch: meta-iteration, >= 0.
        final_std: ceiling from ``epochs`` on, in ``(0, 1]``.
        epochs: meta-iterations over which the ceiling falls, >= 1.
    """
    if epoch < 0 or epochs < 1 or not 0 < final_std <= 1:
        raise ValueError(f"need epoch >= 0, epochs >= 1 and 0 < final_std <= 1, got {epoch}, {epochs}, {final_std}")
    return final_std ** (min(epoch, epochs) / epochs)


@torch.no_grad()
def project_log_std(log_std: torch.Tensor, ceiling: float) -> None:
    """Clamp ``log_std`` in place to ``<= log(ceiling)`` (every action dimension on its own)."""
    log_std.clamp_(max=math.log(ceiling))
