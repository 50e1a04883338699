"""A linear learning-rate schedule for the outer (meta) optimiser.

PPO implementations anneal Adam's step size to (near) zero over the run (CleanRL's ``anneal_lr``,
the original PPO's Atari and MuJoCo settings): late in training the policy is good, the advantages
are small and noisy, and a constant step keeps moving it away from what it has learnt. On MT10 the
no-entropy run peaked at 0.51 at 10M env steps and fell to 0.44 at 20M with a constant step
(docs/results.md).
"""

from __future__ import annotations


def linear_lr_factor(epoch: int, total_epochs: int, final_fraction: float) -> float:
    """The multiplier of every group's base learning rate in meta-iteration ``epoch`` (0-based).

    ``1 - (1 - final_fraction) * epoch / total_epochs``: 1 at epoch 0, falling by the same amount
    every iteration, ``final_fraction`` at ``total_epochs`` and after (so the last iteration of a run,
    ``total_epochs - 1``, still takes a step when ``final_fraction`` is 0). A pure function of the
    epoch: a resumed run with the same ``trainer.max_epochs`` steps exactly as the uninterrupted one.

    Args:
        epoch: meta-iteration, >= 0.
        total_epochs: iterations of the schedule (``trainer.max_epochs``), >= 1.
        final_fraction: the multiplier at ``total_epochs``, in ``[0, 1]``.
    """
    if epoch < 0 or total_epochs < 1 or not 0 <= final_fraction <= 1:
        raise ValueError(f"need epoch >= 0, total_epochs >= 1 and 0 <= final_fraction <= 1, got {epoch}, {total_epochs}, {final_fraction}")
    return 1.0 - (1.0 - final_fraction) * min(epoch, total_epochs) / total_epochs
