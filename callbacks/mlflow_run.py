"""The MLflow run's life: tags, status, continuation on resume, stale runs, checkpoint upload.

* The experiment is tagged a training experiment (``mlflow.experimentKind``), not a GenAI one.
* Tags: benchmark, env name, policy class, stage, run folder, git commit (``mlflow.source.git.commit``,
  which the UI shows) when the code is in a git checkout.
* Every checkpoint carries ``checkpoint["mlflow"] = {run_id, experiment_id, tracking_uri}``; the CLI
  reads it before the logger exists and passes ``run_id``, so a resumed fit goes on in the same run
  (set back to RUNNING here).
* Ctrl-C and SIGTERM end the run KILLED, other exceptions FAILED (through :class:`MLflowRunLogger`).
* ``kill -9`` runs no code. While fitting, ``<default_root_dir>/.mlflow_active_run.json`` names the
  run and the process (pid, host); teardown removes it. A later start in the same folder that finds
  the file with a dead pid on this host marks that run KILLED if it is still RUNNING (a resume of the
  same run instead continues it).
* A kill between writing ``last.ckpt`` and Lightning logging that epoch's ``train/*`` metrics would
  lose them; the callback keeps them in its checkpoint state and a resume logs whichever are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.mlflow_logger import MLflowRunLogger

CHECKPOINT_KEY = "mlflow"
# The experiment type the MLflow 3 UI reads (its "custom model development" = a training experiment).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ACTIVE_RUN_FILE = ".mlflow_active_run.json"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    """The trainer's MLflow loggers."""
    return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]


def upload_artifact(logger: MLFlowLogger, path: str, artifact_path: str | None = None) -> None:
    """``log_artifact`` through :meth:`MLflowRunLogger.guarded` (a failing server does not end the run)."""
    if isinstance(logger, MLflowRunLogger):
        logger.guarded("uploading artifacts", logger.experiment.log_artifact, logger.run_id, path, artifact_path)
    else:
        logger.experiment.log_artifact(logger.run_id, path, artifact_path)


def git_commit(path: str = _REPO_ROOT) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the checkout at ``path``, or ``None`` outside git."""
    try:
        commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip(), bool(status.stdout.strip())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_stale_run(marker_path: str, current_run_id: str | None) -> str | None:
    """If ``marker_path`` names a run whose process died without tearing down, mark it KILLED.

    Returns the id of the run marked, else ``None``. Only a process on this host can be checked;
    a run of the same id as ``current_run_id`` is being resumed and is left alone.
    """
    try:
        with open(marker_path) as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    run_id = marker.get("run_id")
    if not run_id or run_id == current_run_id or marker.get("host") != socket.gethostname() or _pid_alive(int(marker.get("pid", -1))):
        return None
    from mlflow import MlflowClient

    try:
        client = MlflowClient(marker["tracking_uri"])
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_tag(run_id, "metarl.terminated_by", f"process {marker['pid']} died without shutdown (found by a later start)")
        client.set_terminated(run_id, "KILLED")
    except Exception as error:  # a different store or a deleted run: nothing to fix, never block a start
        rank_zero_warn(f"could not check stale MLflow run {run_id}: {error}")
        return None
    return run_id


class MLflowRunCallback(Callback):
    """Tags, terminal status, resume continuation and checkpoint upload of the MLflow run.

    Args:
        log_checkpoints: upload ``best.ckpt`` and ``last.ckpt`` to the run's ``checkpoints/`` artifacts
            at the end of fitting and when a fit is interrupted.
        tag_git_commit: tag the run with the git commit of this checkout (and whether it had edits).
    """

    def __init__(self, log_checkpoints: bool = True, tag_git_commit: bool = True) -> None:
        self.log_checkpoints = log_checkpoints
        self.tag_git_commit = tag_git_commit
        self._epoch_metrics: dict[str, Any] | None = None
        self._restored_epoch_metrics: dict[str, Any] | None = None
        self._marker_path: str | None = None

    @property
    def state_key(self) -> str:
        return "MLflowRunCallback"

    # ------------------------------------------------------------------------------------ start
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Open (or reopen) the run, tag it, take over stale runs of this folder."""
        if not trainer.is_global_zero:
            return
        for logger in mlflow_loggers(trainer):
            client, run_id = logger.experiment, logger.run_id
            experiment = client.get_experiment(logger.experiment_id)
            if EXPERIMENT_KIND_TAG not in experiment.tags:
                # MLflow 3 opens an experiment without a kind as a GenAI traces page.
                client.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            if isinstance(logger, MLflowRunLogger) and logger.resuming and stage == "fit":
                client.update_run(run_id, status="RUNNING")
                resumes = int(client.get_run(run_id).data.tags.get("metarl.resume_count", "0")) + 1
                client.set_tag(run_id, "metarl.resume_count", str(resumes))
            for key, value in self._tags(trainer, pl_module, stage).items():
                client.set_tag(run_id, key, value)
            existing = client.get_run(run_id).data.params
            for key, value in self._versions(trainer).items():
                if key not in existing:  # a resumed run has them already (MLflow params are immutable)
                    client.log_param(run_id, key, value)
        loggers = mlflow_loggers(trainer)
        marker = os.path.join(trainer.default_root_dir, ACTIVE_RUN_FILE)
        current = loggers[0].run_id if loggers else None
        stale = mark_stale_run(marker, current)
        if stale:
            rank_zero_warn(f"MLflow run {stale} of {trainer.default_root_dir} was left RUNNING by a dead process: marked KILLED")
        if stage == "fit" and loggers:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            logger = loggers[0]
            with open(marker, "w") as handle:
                json.dump({"run_id": current, "tracking_uri": logger._tracking_uri, "pid": os.getpid(), "host": socket.gethostname()}, handle)
            self._marker_path = marker

    @staticmethod
    def _versions(trainer: L.Trainer) -> dict[str, str]:
        """Benchmark, simulator and reward-function versions: what makes Meta-World numbers comparable."""
        bench = getattr(trainer.datamodule, "benchmark_info", None)
        if bench is None:  # nav2d: no simulator
            return {}
        import mujoco

        return {
            "versions.metaworld": str(bench.metaworld_version),
            "versions.mujoco": str(mujoco.__version__),
            "versions.reward_function": str(bench.reward_function_version),
        }

    def _tags(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, str]:
        tags = {"stage": str(getattr(stage, "value", stage)), "run_dir": os.path.abspath(trainer.default_root_dir)}
        datamodule = trainer.datamodule
        for name in ("benchmark", "env_name"):
            value = getattr(datamodule, name, None)
            if value is not None:
                tags[name] = str(value)
        policy = getattr(pl_module, "policy", None)
        if policy is not None:
            tags["policy_class"] = f"{type(policy).__module__}.{type(policy).__qualname__}"
        if self.tag_git_commit:
            found = git_commit()
            if found is not None:
                tags["mlflow.source.git.commit"] = tags["git_commit"] = found[0]
                tags["git_dirty"] = str(found[1]).lower()
        return tags

    # --------------------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the run so a resume continues it (read by the CLI before the logger exists)."""
        loggers = mlflow_loggers(trainer)
        if loggers and trainer.is_global_zero:
            logger = loggers[0]
            checkpoint[CHECKPOINT_KEY] = {"run_id": logger.run_id, "experiment_id": logger.experiment_id, "tracking_uri": logger._tracking_uri}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Keep this epoch's epoch-level metrics: the checkpoint is written before Lightning logs them."""
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and v.numel() == 1}
        # The step Lightning will log them at (it decrements this counter around the epoch-end log).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1
        self._epoch_metrics = {"step": step, "metrics": metrics}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_metrics": self._epoch_metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_epoch_metrics = state_dict.get("epoch_metrics")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On resume, log the saved epoch's epoch-level metrics that the killed process never logged."""
        saved, self._restored_epoch_metrics = self._restored_epoch_metrics, None
        if not saved or not trainer.is_global_zero:
            return
        from mlflow.entities import Metric

        for logger in mlflow_loggers(trainer):
            client, run_id = logger.experiment, logger.run_id
            missing = []
            for key, value in saved["metrics"].items():
                name = logger._prefix + key if logger._prefix else key
                if not any(m.step == saved["step"] for m in client.get_metric_history(run_id, name)):
                    missing.append(Metric(name, value, 0, saved["step"]))
            if missing:
                client.log_batch(run_id, metrics=missing)

    # -------------------------------------------------------------------------------------- end
    def _upload_checkpoints(self, trainer: L.Trainer) -> None:
        if not (self.log_checkpoints and trainer.is_global_zero):
            return
        paths = []
        for callback in trainer.checkpoint_callbacks:
            for path in (getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")):
                if path and os.path.isfile(path) and path not in paths:
                    paths.append(path)
        for logger in mlflow_loggers(trainer):
            for path in paths:
                upload_artifact(logger, path, "checkpoints")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Upload the checkpoints (the run is then finalised FINISHED by the logger)."""
        self._upload_checkpoints(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """KILLED for Ctrl-C / SIGTERM, FAILED otherwise; upload whatever checkpoints exist."""
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        for logger in mlflow_loggers(trainer):
            if isinstance(logger, MLflowRunLogger):
                logger.set_final_status("killed" if interrupted else "failed")
            if trainer.is_global_zero:
                with contextlib.suppress(Exception):  # reporting must not mask the original exception
                    logger.experiment.set_tag(logger.run_id, "metarl.exception", f"{type(exception).__name__}: {exception}"[:5000])
        if trainer.state.fn == "fit":
            with contextlib.suppress(Exception):
                self._upload_checkpoints(trainer)
        # The status is about to be set: nothing stale for a later start to fix.
        self._remove_marker()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The process ends cleanly: its run is no longer ours to watch."""
        self._remove_marker()

    def _remove_marker(self) -> None:
        if self._marker_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._marker_path)
            self._marker_path = None
