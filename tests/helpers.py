"""Shared test helpers: a quiet in-process Trainer run on 2-D navigation."""

from __future__ import annotations

import lightning as L
import torch

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule


class EpochMetrics(L.Callback):
    """Collects the epoch-mean train metrics into a list of dicts."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})


def quiet_trainer(max_epochs: int, callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    """A CPU Trainer with no logger, checkpoints, bars or validation: for tests that train in-process.
    ``kwargs`` add or override Trainer arguments (e.g. ``enable_checkpointing=True`` for a checkpoint callback)."""
    defaults = dict(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        accelerator="cpu",
    )
    return L.Trainer(**{**defaults, **kwargs})


def train_nav2d(policy: torch.nn.Module, epochs: int, seed: int = 0, data_kwargs: dict | None = None, **module_kwargs) -> list[dict[str, float]]:
    """Meta-train ``policy`` on 2-D navigation in-process; returns per-epoch metrics."""
    torch.set_num_threads(1)
    L.seed_everything(seed, verbose=False)
    data = MetaTaskDataModule("nav2d", seed=seed, **(data_kwargs or {}))
    module = MetaRLModule(policy, **module_kwargs)
    recorder = EpochMetrics()
    trainer = quiet_trainer(epochs, [recorder])
    trainer.fit(module, data)
    return recorder.history
