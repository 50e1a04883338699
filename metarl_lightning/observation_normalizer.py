"""Observation normalisation: the policy sees its env observation standardised by running statistics.

Meta-World's observation mixes coordinates in metres that move by centimetres (the hand, the
object) with quaternions and flags; standardising every coordinate puts them on one scale for the
first layer (Andrychowicz et al. 2021, "What matters in on-policy RL", found it among the most
important PPO choices). ``model.normalize_observations`` turns it on.

Where it applies: the leading ``columns`` coordinates of the policy input, the env's own
observation. The task one-hot of the MT benchmarks and the context inputs (previous action,
scaled reward, episode-start flag) come after it and pass unchanged: they are already O(1), and a
rare flag standardised would be a spike of 10 at every episode start.

When the statistics move: the collector records the raw observations of every training rollout,
and the module folds them in once per meta-iteration, after the outer update (:meth:`commit`). So
within an iteration the transform is fixed: the support and query rollouts, the inner step and the
outer loss's recomputation all see the same inputs (the rollouts store the standardised ones).
Before the first commit the transform is the identity. Evaluation uses the statistics as they are
and records nothing. Under DDP every rank folds in the sums of all ranks, so the statistics stay
identical across ranks. They are buffers of the module: saved in every checkpoint, restored on
resume and for ``validate`` / ``test``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from metarl_lightning.algorithms.running_moments import Moments, merge_moments, moments_from_shifted_sums, standardize_, standardizing_scale


class ObservationNormalizer(nn.Module):
    """Running mean and variance of the leading coordinates of the policy input, and the transform.

    Args:
        dim: size of the policy input (``policy.observation_dim``).
        clip: standardised values are clipped to ``[-clip, clip]``.
    """

    def __init__(self, dim: int, clip: float = 10.0) -> None:
        super().__init__()
        if clip <= 0:
            raise ValueError(f"clip: must be > 0, got {clip}")
        self.dim = dim
        self.clip = clip
        # float64: the count reaches 1e8 on ML45 and the merged moments must not drift.
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        # How many leading input coordinates are the env's observation (0: not set yet, nothing applies).
        self.register_buffer("columns", torch.zeros((), dtype=torch.long))
        self._pending: list[np.ndarray] | None = None  # [count], shifted sum, shifted sum of squares
        self._shift = np.zeros(0)  # the mean at the batch's first record (the sums' shift)
        # (mean, scale) as float32 CPU tensors, () while inactive, None when stale: built once per
        # set of statistics, so a call per env step converts nothing.
        self._transform: tuple[torch.Tensor, ...] | None = None

    # ------------------------------------------------------------------------------ configuration
    def set_columns(self, columns: int) -> None:
        """Normalise the leading ``columns`` coordinates (the env's observation; the data side knows
        its size). A checkpoint made with another layout is refused rather than misapplied."""
        if not 0 < columns <= self.dim:
            raise ValueError(f"observation normalisation: columns must be in [1, {self.dim}], got {columns}")
        current = int(self.columns)
        if current not in (0, columns):
            raise ValueError(
                f"observation normalisation: the statistics cover {current} observation coordinates, "
                f"the data gives {columns}: a checkpoint from another benchmark?"
            )
        self.columns.fill_(columns)
        self._transform = None

    @property
    def active(self) -> bool:
        """Whether the transform does anything (columns set and statistics recorded)."""
        return int(self.columns) > 0 and float(self.count) > 0

    # ------------------------------------------------------------------------------- transform
    def normalize(self, policy_input: np.ndarray) -> np.ndarray:
        """``[N, >= columns]`` float32 policy inputs with the leading ``columns`` standardised (a copy;
        the input itself is returned unchanged while :attr:`active` is false)."""
        if self._transform is None:
            n = int(self.columns)
            self._transform = (self.mean[:n].float().cpu(), standardizing_scale(self.var[:n]).float().cpu()) if self.active else ()
        if not self._transform:
            return policy_input
        mean, scale = self._transform
        out = np.array(policy_input, dtype=np.float32, copy=True)
        # A view of the leading columns: standardised in place, the rest of the row untouched.
        standardize_(torch.from_numpy(out)[:, : mean.shape[0]], mean, scale, self.clip)
        return out

    # ------------------------------------------------------------------------------- statistics
    def record(self, policy_input: np.ndarray) -> None:
        """Add raw ``[N, >= columns]`` inputs to the pending batch (folded in by :meth:`commit`)."""
        if self._pending is None:
            n = int(self.columns)
            if n == 0:
                return
            self._shift = self.mean[:n].cpu().numpy()
            self._pending = [np.zeros(1), np.zeros(n), np.zeros(n)]
        n = len(self._shift)
        # Shifted by the current mean: the sums stay small and the variance exact (running_moments).
        x = np.asarray(policy_input[:, :n], dtype=np.float64) - self._shift
        self._pending[0] += len(x)
        self._pending[1] += x.sum(0)
        self._pending[2] += np.square(x).sum(0)

    @property
    def pending_count(self) -> int:
        """Observations recorded since the last :meth:`commit` (on this process)."""
        return 0 if self._pending is None else int(self._pending[0][0])

    def commit(self, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the pending batch into the running statistics and start a new batch.

        Args:
            sum_over_ranks: sums a tensor over the data-parallel ranks (``None``: one process).
                Every rank must call ``commit`` at the same point, recorded or not.
        """
        n = int(self.columns)
        if n == 0:
            return
        flat = torch.zeros(1 + 2 * n, dtype=torch.float64)
        if self._pending is not None:
            flat = torch.from_numpy(np.concatenate(self._pending))
        self._pending = None
        if sum_over_ranks is not None:
            flat = sum_over_ranks(flat.to(self.mean.device)).cpu()
        count, total, total_sq = flat[0], flat[1 : 1 + n], flat[1 + n :]
        if float(count) == 0:
            return
        batch = moments_from_shifted_sums(count, self.mean[:n].cpu(), total, total_sq)
        merged = merge_moments(Moments(self.count.cpu(), self.mean[:n].cpu(), self.var[:n].cpu()), batch)
        self.count.copy_(merged.count)
        self.mean[:n] = merged.mean.to(self.mean.device)
        self.var[:n] = merged.var.to(self.var.device)
        self._transform = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # New statistics: the cached float32 transform is stale.
        self._transform = None
        super()._load_from_state_dict(*args, **kwargs)
