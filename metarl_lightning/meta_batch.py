"""What the DataLoader hands to ``training_step``: which tasks to run, and the noise to explore with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MetaBatch:
    """One meta-iteration's input for this rank.

    Exploration noise is drawn for the whole (global) meta-batch from a generator seeded by
    ``(seed, iteration)`` and then sliced per rank, so a run is reproducible and its tasks and noise
    do not depend on how many ranks share the meta-batch.

    Attributes:
        iteration: global meta-iteration index (epoch * batches_per_epoch + batch index).
        split: ``"train"`` or ``"test"``.
        tasks: this rank's task descriptors, one per task-agent.
        support_noise: ``[K, E, T, A]`` standard-normal action noise for the support rollouts.
        query_noise: ``[K, E, T, A]`` standard-normal action noise for the query rollouts.
    """

    iteration: int
    split: str
    tasks: list[Any]
    support_noise: torch.Tensor
    query_noise: torch.Tensor

    @property
    def num_agents(self) -> int:
        """Task-agents on this rank."""
        return len(self.tasks)
