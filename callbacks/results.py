"""``results.json`` and ``training_curves.png`` in the run folder, and in the MLflow run.

Refreshed after every evaluation, at the end of fitting and when a fit is interrupted. The history
lives in this callback's checkpoint state, so a resumed run continues the same file. ``validate`` and
``test`` write ``validate_results.json`` / ``test_results.json`` instead (they never touch the
fit's files).

``results.json`` (``schema_version`` 1)::

    schema_version   1
    status           running | finished | killed | failed
    config           the resolved config (what ``config.yaml`` holds), as a mapping
    mlflow           {run_id, tracking_uri} or null
    epochs_completed int
    env_steps        int, total environment steps (all ranks, support + query)
    wall_time_s      float, training time summed over the processes that made the run
    train            one entry per epoch: epoch, step, env_steps, wall_time_s and the epoch means of
                     pre/post_adaptation_return, pre/post_adaptation_success, meta_loss, policy_loss,
                     value_loss, entropy
    eval             one entry per evaluation: epoch, step, env_steps and
                     pre/post_adaptation_return, pre/post_adaptation_success
    protocol         one entry per official-protocol evaluation (callbacks.evaluation): epoch,
                     step, env_steps, success_rate, return, success_per_task {class: rate} and
                     the counts it ran with (protocol, num_evals, adaptation/evaluation episodes,
                     envs_per_class, max_episode_steps; ``split: train`` for the protocol on the
                     training goals, a meta-train number: ``metarl_lightning.protocol_split``)

``eval_per_task.csv`` holds the per-class table of every protocol evaluation (epoch, env_steps,
class, success_rate, split), also uploaded to MLflow. ``test_results.json`` /
``validate_results.json`` hold the stage's held-out protocol result under ``protocol`` and the
training-goal one, when an evaluation callback ran with ``split: train``, under ``protocol_train``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.atomic_io import write_atomic, write_json_atomic
from callbacks.curves import plot_training_curves
from callbacks.mlflow_run import mlflow_loggers, upload_artifact
from metarl_lightning.protocol_split import is_train_split

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
CURVES_FILE = "training_curves.png"
PER_TASK_FILE = "eval_per_task.csv"
TRAIN_KEYS = (
    "pre_adaptation_return",
    "post_adaptation_return",
    "pre_adaptation_success",
    "post_adaptation_success",
    "meta_loss",
    "policy_loss",
    "value_loss",
    "entropy",
)
EVAL_KEYS = ("pre_adaptation_return", "post_adaptation_return", "pre_adaptation_success", "post_adaptation_success")


def _scalar(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


class ResultsWriter(Callback):
    """Writes ``results.json`` and ``training_curves.png`` to ``default_root_dir`` (and to MLflow).

    Args:
        plot: draw ``training_curves.png``.
        log_to_mlflow: upload both files to the MLflow run whenever they are refreshed.
    """

    def __init__(self, plot: bool = True, log_to_mlflow: bool = True) -> None:
        self.plot = plot
        self.log_to_mlflow = log_to_mlflow
        self.config: dict[str, Any] | None = None
        self.train: list[dict[str, Any]] = []
        self.eval: list[dict[str, Any]] = []
        self.protocol: list[dict[str, Any]] = []
        self._wall_before = 0.0  # training seconds of earlier processes of this run (from the checkpoint)
        self._started: float | None = None

    @property
    def state_key(self) -> str:
        return "ResultsWriter"

    def set_run_config(self, config: dict[str, Any]) -> None:
        """The resolved config to embed (the CLI calls this; without it, the hyper-parameters are used)."""
        self.config = config

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "eval": self.eval, "protocol": self.protocol, "wall_time_s": self._wall_time()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = list(state_dict["train"])
        self.eval = list(state_dict["eval"])
        self.protocol = list(state_dict.get("protocol", []))  # absent in checkpoints before it existed
        self._wall_before = float(state_dict["wall_time_s"])

    def _wall_time(self) -> float:
        return self._wall_before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    # --------------------------------------------------------------------------------- collect
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start this process's share of the wall-clock time."""
        self._started = time.perf_counter()

    @staticmethod
    def _position(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int]:
        env_steps = getattr(pl_module, "env_steps", 0)
        return {
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.fit_loop.epoch_loop._batches_that_stepped),
            "env_steps": int(env_steps),
        }

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Append this epoch's means (runs before the checkpoint is written, so the checkpoint holds it)."""
        metrics = trainer.callback_metrics
        entry: dict[str, Any] = self._position(trainer, pl_module)
        entry["step"] -= 1  # the step the epoch's last iteration was logged at
        entry["wall_time_s"] = round(self._wall_time(), 3)
        for key in TRAIN_KEYS:
            entry[key] = _scalar(metrics, f"train/{key}")
        self.train.append(entry)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the evaluation and refresh the files (``validate``: write ``validate_results.json``)."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            self._write_stage_results(trainer, "validate", "val")
            return
        # Evaluation runs before the epoch's last iteration is counted: no -1 (the step val/* is logged at).
        entry: dict[str, Any] = self._position(trainer, pl_module)
        for key in EVAL_KEYS:
            entry[key] = _scalar(trainer.callback_metrics, f"val/{key}")
        self.eval.append(entry)
        self._refresh(trainer, pl_module, "running")

    def record_protocol_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule, result: dict[str, Any]) -> None:
        """Append an official-protocol result of ``fit`` (called by the evaluation callback) and refresh."""
        entry: dict[str, Any] = self._position(trainer, pl_module)
        entry["wall_time_s"] = round(self._wall_time(), 3)
        entry.update({k: result[k] for k in ("success_rate", "return", "success_per_task", "counts")})
        self.protocol.append(entry)
        self._refresh(trainer, pl_module, "running")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``test``: write ``test_results.json``."""
        self._write_stage_results(trainer, "test", "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Final refresh and the end-of-run summary in the terminal."""
        payload = self._refresh(trainer, pl_module, "finished")
        if payload is not None:
            rank_zero_info(run_summary(payload, trainer.default_root_dir))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Leave the files saying how the run ended."""
        if trainer.state.fn == "fit":
            status = "killed" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"
            with contextlib.suppress(Exception):  # must not mask the original exception
                payload = self._refresh(trainer, pl_module, status)
                if payload is not None:
                    rank_zero_info(run_summary(payload, trainer.default_root_dir))

    # ----------------------------------------------------------------------------------- write
    def _run_config(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if self.config is not None:
            return self.config
        datamodule = trainer.datamodule
        return {"model": dict(pl_module.hparams), "data": dict(getattr(datamodule, "hparams", {}) or {})}

    def _mlflow(self, trainer: L.Trainer) -> dict[str, Any] | None:
        loggers = mlflow_loggers(trainer)
        return {"run_id": loggers[0].run_id, "tracking_uri": loggers[0]._tracking_uri} if loggers else None

    def results(self, trainer: L.Trainer, pl_module: L.LightningModule, status: str) -> dict[str, Any]:
        """The ``results.json`` payload (module docstring)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "status": status,
            "config": self._run_config(trainer, pl_module),
            "mlflow": self._mlflow(trainer),
            "epochs_completed": len(self.train),
            "env_steps": int(getattr(pl_module, "env_steps", 0)),
            "wall_time_s": round(self._wall_time(), 3),
            "train": self.train,
            "eval": self.eval,
            "protocol": self.protocol,
        }

    def _refresh(self, trainer: L.Trainer, pl_module: L.LightningModule, status: str) -> dict[str, Any] | None:
        """Write the files (rank 0); return what ``results.json`` now holds (``None`` on other ranks)."""
        if not trainer.is_global_zero:
            return None
        payload = self.results(trainer, pl_module, status)
        paths = [os.path.join(trainer.default_root_dir, RESULTS_FILE)]
        write_json_atomic(paths[0], payload)
        if self.plot:
            paths.append(os.path.join(trainer.default_root_dir, CURVES_FILE))
            plot_training_curves(payload, paths[-1])
        if self.protocol:
            paths.append(os.path.join(trainer.default_root_dir, PER_TASK_FILE))
            write_atomic(paths[-1], lambda temporary: _write_per_task_csv(self.protocol, temporary))
        self._upload(trainer, paths)
        return payload

    def _write_stage_results(self, trainer: L.Trainer, stage: str, prefix: str) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: _scalar(trainer.callback_metrics, f"{prefix}/{k}") for k in EVAL_KEYS}
        # The official protocol of this stage, when an evaluation callback ran it (held-out and
        # training goals apart: a meta-train number must never be read as the meta-test one).
        ran = [cb.last_result for cb in trainer.callbacks if getattr(cb, "last_result", None) is not None]
        protocol = [r for r in ran if not is_train_split(r)]
        protocol_train = [r for r in ran if is_train_split(r)]
        payload = {
            "schema_version": SCHEMA_VERSION,
            "stage": stage,
            "checkpoint": trainer.ckpt_path,
            "config": self.config,
            "mlflow": self._mlflow(trainer),
            "metrics": metrics,
            "protocol": protocol[0] if protocol else None,
            "protocol_train": protocol_train[0] if protocol_train else None,
        }
        path = os.path.join(trainer.default_root_dir, f"{stage}_results.json")
        write_json_atomic(path, payload)
        self._upload(trainer, [path])

    def _upload(self, trainer: L.Trainer, paths: list[str]) -> None:
        if self.log_to_mlflow:
            for logger in mlflow_loggers(trainer):
                for path in paths:
                    upload_artifact(logger, path)


def _write_per_task_csv(entries: list[dict[str, Any]], path: str) -> None:
    """One row per (evaluation, class): ``epoch,env_steps,class,success_rate,split``."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "env_steps", "class", "success_rate", "split"])
        for entry in entries:
            split = "train" if is_train_split(entry) else "test"
            for name, rate in entry["success_per_task"].items():
                writer.writerow([entry["epoch"], entry["env_steps"], name, rate, split])


def run_summary(results: dict[str, Any], run_dir: str) -> str:
    """The end-of-run lines: status, epochs, env steps, wall time, evaluations, where everything is."""
    minutes = results["wall_time_s"] / 60
    lines = [f"Run {results['status']}: {results['epochs_completed']} epochs, {results['env_steps']:,} env steps, {minutes:.1f} min"]
    entries = results.get("protocol") or []
    for label, protocol in (("", [e for e in entries if not is_train_split(e)]),
                            (", training goals", [e for e in entries if is_train_split(e)])):
        if protocol:
            best = max(protocol, key=lambda e: e["success_rate"])
            last = protocol[-1]
            kind = last["counts"]["protocol"]
            lines.append(f"  Meta-World evaluation ({kind}{label}): last {last['success_rate']:.3f} at {last['env_steps']:,} "
                         f"env steps, best {best['success_rate']:.3f} at {best['env_steps']:,}")
    validation = [e for e in results.get("eval") or [] if e.get("post_adaptation_success") is not None]
    if validation:
        lines.append(f"  validation (stochastic, after adaptation): success {validation[-1]['post_adaptation_success']:.3f}, "
                     f"return {validation[-1]['post_adaptation_return']:.1f}")
    lines.append(f"  run folder: {os.path.abspath(run_dir)} (results.json, training_curves.png, checkpoints/)")
    mlflow = results.get("mlflow")
    if mlflow:
        lines.append(f"  MLflow run {mlflow['run_id']}: mlflow ui --backend-store-uri {mlflow['tracking_uri']}")
    return "\n".join(lines)
