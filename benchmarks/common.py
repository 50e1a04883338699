"""What the benchmark scripts share: timing full meta-training iterations in a quiet Trainer."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class IterationMeter(L.Callback):
    """Records env steps/s and the collection share of every meta-iteration (as the module logs them)."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.collect_shares: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module logs these per epoch (one meta-iteration per epoch here), not per step.
        self.rates.append(float(trainer.callback_metrics["train/env_steps_per_s"]))
        self.collect_shares.append(float(trainer.callback_metrics["train/collect_fraction"]))

    @property
    def median_rate(self) -> float:
        """Median env steps/s, leaving out the first iteration (worker start-up, lazy init)."""
        return float(np.median(self.rates[1:]))

    @property
    def median_collect_share(self) -> float:
        """Median share of an iteration spent collecting rollouts, first iteration left out."""
        return float(np.median(self.collect_shares[1:]))


def measure_fit(module: L.LightningModule, data: L.LightningDataModule, epochs: int, **trainer_kwargs: Any) -> IterationMeter:
    """Fit without logger, checkpoints, bars or validation; returns the per-iteration measurements."""
    meter = IterationMeter()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[meter], **trainer_kwargs)
    trainer.fit(module, data)
    return meter


def config_policy(config: str, observation_dim: int, action_dim: int) -> torch.nn.Module:
    """The policy a config in ``configs/`` trains (class and init args), so benchmarks measure it.

    Args:
        config: file name in ``configs/``, e.g. ``"mt10.yaml"``.
        observation_dim, action_dim: the env's sizes (linked from the data module in the CLI).
    """
    spec = yaml.safe_load((CONFIGS / config).read_text())["model"]["policy"]
    module_name, class_name = spec["class_path"].rsplit(".", 1)
    policy_class = getattr(importlib.import_module(module_name), class_name)
    return policy_class(observation_dim, action_dim, **spec.get("init_args", {}))


class FirstStepTimer(L.Callback):
    """Prints the seconds from ``METARL_T0`` (wall clock, set by the parent) to each start-up mark.

    For ``--trainer.callbacks+=benchmarks.common.FirstStepTimer`` on a ``cli.py fit`` that the
    start-up benchmark times: ``parsed`` (imports, config parsed and checked; this callback is
    built), ``setup`` (the MLflow run started, env workers started), ``first_step``
    (the train envs are built and the first collection starts).
    """

    def __init__(self) -> None:
        self.t0 = float(os.environ.get("METARL_T0", time.time()))
        self._mark("parsed")

    def _mark(self, name: str) -> None:
        print(f"STARTUP {name} {time.time() - self.t0:.2f}", flush=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._mark("setup")  # Lightning starts the logger's run and sets up the data module first

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0:
            # Envs that build while the run starts (the CLI's prestart) are waited for here, as the
            # collection's first reset would: the mark is when the first env step can be taken.
            wait_built = getattr(trainer.datamodule.train_collector.env, "wait_built", None)
            if wait_built is not None:
                wait_built()
            self._mark("first_step")
