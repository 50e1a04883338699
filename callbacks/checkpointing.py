"""Best and last checkpoints in the run's folder, written atomically, carrying RNG state.

``<default_root_dir>/checkpoints/last.ckpt`` is rewritten at the end of every training epoch (after
that epoch's evaluation, if any), so a run killed at any moment resumes from its last completed
epoch. ``best.ckpt`` is rewritten when an evaluation improves the monitored metric. Both hold what an
exact resume needs: module and optimiser state, loop counters, the data module's state (Lightning
puts those in), every callback's state (results history, MLflow run id), and, added here, the
python/numpy/torch RNG state of every rank.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from callbacks import rng_state
from callbacks.atomic_io import commit, temporary_path
from metarl_lightning.checks.checkpoint import POLICY_CONFIG_KEY

RNG_KEY = "rng_states"


class RunCheckpoint(ModelCheckpoint):
    """``best.ckpt`` (monitored) and ``last.ckpt`` (every epoch) under ``<default_root_dir>/checkpoints``.

    The default monitor is the mean return of the held-out tasks after adaptation: on nav2d success
    (reaching the goal) is rare early on, so return ranks checkpoints better. Meta-World configs
    should monitor ``val/post_adaptation_success`` (the published metric) with ``mode: max``.

    Args:
        monitor: the logged evaluation metric that ranks checkpoints.
        mode: ``max`` or ``min`` of ``monitor``.
        dirpath: where checkpoints go; ``null``: ``<trainer.default_root_dir>/checkpoints``.
        save_best: keep ``best.ckpt``.
        save_last: keep ``last.ckpt`` (needed for ``--ckpt_path last``).
        verbose: report every save.
    """

    def __init__(
        self,
        monitor: str = "val/post_adaptation_return",
        mode: Literal["max", "min"] = "max",
        dirpath: str | None = None,
        save_best: bool = True,
        save_last: bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1 if save_best else 0,
            save_last=save_last,
            verbose=verbose,
            auto_insert_metric_name=False,
            # Fixed names (no -v1 suffixes) so `--ckpt_path last` and the README paths always hold.
            enable_version_counter=False,
            save_on_train_epoch_end=True,
        )
        self._evaluated_this_epoch = False
        self._pending_rng: list[dict[str, Any]] | None = None
        # ``{"class_path", "init_args"}`` of the policy, set by the CLI (the module only holds the instance).
        self.policy_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------ where
    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve ``dirpath`` to the run folder, not the logger's (MLflow has none with sqlite)."""
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        # `ckpt_path="last"` is resolved before `setup`; look where `setup` will put them.
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    # ------------------------------------------------------------------------------------- when
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember that this epoch has fresh evaluation metrics (saving waits for the epoch's end)."""
        if not trainer.sanity_checking:
            self._evaluated_this_epoch = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Best if this epoch evaluated and improved; last always.

        Lightning's own rule saves ``last`` only in epochs that also saved a top-k checkpoint,
        which with evaluation every N epochs would leave up to N-1 epochs unrecoverable.
        """
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self._evaluated_this_epoch and self.save_top_k != 0:
            if self.monitor in candidates:
                self._save_topk_checkpoint(trainer, candidates)
            else:
                rank_zero_warn(f"checkpoint.monitor={self.monitor!r} was not logged by the evaluation; no best.ckpt this epoch")
        self._evaluated_this_epoch = False
        self._save_last_checkpoint(trainer, candidates)

    # -------------------------------------------------------------------------------------- how
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write to a temporary sibling, then ``os.replace``: a crash mid-save keeps the old file."""
        temporary = temporary_path(filepath)
        try:
            # Every rank takes part (RNG gather, barriers); only global rank 0 writes the file.
            trainer.save_checkpoint(temporary, self.save_weights_only)
            if trainer.is_global_zero:
                commit(temporary, filepath)
        finally:
            if trainer.is_global_zero and os.path.exists(temporary):
                os.remove(temporary)  # a failed save leaves no debris next to the good checkpoint
        trainer.strategy.barrier("RunCheckpoint.commit")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    # ----------------------------------------------------------------------------- RNG in, RNG out
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Add the RNG state of every rank (index = global rank) and the policy's config (set by the CLI)."""
        checkpoint[RNG_KEY] = rng_state.capture_all_ranks(trainer.world_size)
        if self.policy_config is not None:
            checkpoint[POLICY_CONFIG_KEY] = self.policy_config

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the saved RNG state for the first training epoch (restoring now would be consumed by set-up)."""
        states = checkpoint.get(RNG_KEY)
        if not states:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"checkpoint has RNG state for {len(states)} ranks, this run has {trainer.world_size}: RNG state not restored")
            return
        self._pending_rng = states

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the generators exactly where the saved run stood when the next epoch began."""
        if self._pending_rng is not None:
            rng_state.restore(self._pending_rng[trainer.global_rank])
            self._pending_rng = None
