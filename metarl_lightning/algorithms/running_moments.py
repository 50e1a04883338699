"""Running mean and variance of a stream of vectors, merged batch by batch (observation normalisation).

A batch is summarised by its count and its sums of ``x - shift`` and ``(x - shift)^2`` for a shift
close to the data (the running mean): the plain sum of squares loses the variance to cancellation
once the mean is large against the spread, the shifted one does not. Batches (and ranks) merge by
Chan, Golub and LeVeque's pairwise rule, exact up to float rounding whatever the batch sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Moments(NamedTuple):
    """Count, mean and (population) variance of a set of vectors.

    Attributes:
        count: number of vectors, a scalar tensor.
        mean: ``[D]``.
        var: ``[D]``, the mean squared deviation (divided by ``count``, not ``count - 1``).
    """

    count: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor


def moments_from_shifted_sums(count: torch.Tensor, shift: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor) -> Moments:
    """The :class:`Moments` of a batch from its shifted sums.

    Args:
        count: number of vectors ``n`` (> 0), a scalar tensor.
        shift: ``[D]``, the value subtracted before summing.
        total: ``[D]``, ``sum_i (x_i - shift)``.
        total_sq: ``[D]``, ``sum_i (x_i - shift)^2``.
    """
    offset = total / count
    # The variance is invariant to the shift; only the mean needs it back.
    var = (total_sq / count - offset.square()).clamp(min=0.0)
    return Moments(count, shift + offset, var)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The :class:`Moments` of the union of two disjoint sets (Chan et al. 1979).

    Either count may be zero (its mean and variance are then ignored).
    """
    count = a.count + b.count
    if float(count) == 0.0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    squares = a.var * a.count + b.var * b.count + delta.square() * (a.count * b.count / count)
    return Moments(count, mean, squares / count)


def standardizing_scale(var: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 / sqrt(var + eps)``: what :func:`standardize_` multiplies by (computed once per set of
    statistics; the eps keeps a constant coordinate, such as Meta-World's hidden goal, finite)."""
    return torch.rsqrt(var + eps)


def standardize_(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, clip: float) -> torch.Tensor:
    """In place over the last dim ``[..., D]``: ``x <- clamp((x - mean) * scale, -clip, clip)``; returns ``x``.

    In place because the collector calls it once per env step (three ops on a view of the step's
    inputs). The clip bounds what a rare value of a nearly constant coordinate can do to the first
    layer (as Stable-Baselines3's ``VecNormalize``, whose default is 10).
    """
    return x.sub_(mean).mul_(scale).clamp_(-clip, clip)
