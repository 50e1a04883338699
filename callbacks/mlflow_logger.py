"""MLFlowLogger that ends its run as FINISHED, FAILED or KILLED, and reopens a resumed run.

Lightning finalises every logger with ``"failed"`` on any exception, Ctrl-C and SIGTERM included;
an operator stopping a job is not a failure, so :class:`~callbacks.mlflow_run.MLflowRunCallback`
tells this logger which status the exception deserves before Lightning finalises it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


class MLflowRunLogger(MLFlowLogger):
    """:class:`MLFlowLogger` with an explicit terminal status and run continuation.

    Args:
        experiment_name: MLflow experiment (created when missing).
        run_name: display name of a new run.
        tracking_uri: ``sqlite:///mlflow.db`` (embedded, relative to the working directory) or the URL
            of an ``mlflow server`` (``http://host:5000``). Always explicit: MLFlowLogger's own default
            is a file store that MLflow 3 refuses.
        tags: extra tags of a new run.
        save_dir: unused with an explicit ``tracking_uri`` (kept for MLFlowLogger compatibility).
        log_model: MLFlowLogger's own checkpoint upload; leave ``false``, the MLflow callback uploads
            ``best.ckpt`` and ``last.ckpt`` itself.
        prefix: prefix of every metric name.
        artifact_location: artifact root of a *new* experiment (``null``: the server's default; for
            sqlite, ``./mlruns`` next to the database).
        run_id: continue this run instead of creating one (set by the CLI from the checkpoint on resume).
        synchronous: MLflow's synchronous logging flag (``null``: MLflow's default).
    """

    def __init__(
        self,
        experiment_name: str = "metarl-lightning",
        run_name: str | None = None,
        tracking_uri: str | None = "sqlite:///mlflow.db",
        tags: dict[str, Any] | None = None,
        save_dir: str | None = "./mlruns",
        log_model: bool = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags=tags,
            save_dir=save_dir,
            log_model=log_model,
            prefix=prefix,
            artifact_location=artifact_location,
            run_id=run_id,
            synchronous=synchronous,
        )
        self._final_status: str | None = None
        self._resuming = run_id is not None

    @property
    def tracking_uri(self) -> str:
        """Where runs are stored (as configured)."""
        return self._tracking_uri

    @property
    def resuming(self) -> bool:
        """Whether this logger continues an existing run (``run_id`` was given)."""
        return self._resuming

    def set_final_status(self, status: str) -> None:
        """Status to end the run with, whatever Lightning passes to :meth:`finalize` (``killed``, ``failed``...)."""
        self._final_status = _STATUS.get(status.lower(), status.upper())

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """End the run with the status set by :meth:`set_final_status`, else Lightning's."""
        if self._final_status is not None:
            status = self._final_status
        super().finalize(_STATUS.get(status, status))
