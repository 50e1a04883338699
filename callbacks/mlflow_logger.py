"""MLFlowLogger that ends its run as FINISHED, FAILED or KILLED, reopens a resumed run, and keeps
training when the tracking server goes away.

Lightning finalises every logger with ``"failed"`` on any exception, Ctrl-C and SIGTERM included;
an operator stopping a job is not a failure, so :class:`~callbacks.mlflow_run.MLflowRunCallback`
tells this logger which status the exception deserves before Lightning finalises it.

A server that fails mid-run must not stall or end training (the run folder has every number): a
failed call prints one warning line; metrics are then kept in memory and retried at most every
``retry_interval_s`` (no call in between, so a dead server costs nothing per step), artifact uploads
are skipped while offline (results are re-uploaded every epoch, checkpoints at the end); the end of the
run says what never reached the server.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

class LazyMlflowClient:
    """An ``MlflowClient`` made on first use.

    Constructing a client opens its store, and for ``sqlite:///`` *creates* the database: a start
    refused by a later check (jsonargparse builds the logger before the model) would leave a new
    ``mlflow.db`` behind.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self._tracking_uri = tracking_uri
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self._tracking_uri)
        return getattr(self._client, name)


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
        import mlflow.tracking

        real_client, mlflow.tracking.MlflowClient = mlflow.tracking.MlflowClient, LazyMlflowClient  # see LazyMlflowClient
        try:
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
        finally:
            mlflow.tracking.MlflowClient = real_client
        self._final_status: str | None = None
        self._resuming = run_id is not None
        self.retry_interval_s = 30.0
        self._pending: list[tuple[dict[str, float], int | None]] = []
        self._offline_until = 0.0
        self._failures: dict[str, int] = {}

    @property
    def tracking_uri(self) -> str:
        """Where runs are stored (as configured)."""
        return self._tracking_uri

    @property
    def resuming(self) -> bool:
        """Whether this logger continues an existing run (``run_id`` was given)."""
        return self._resuming

    # ------------------------------------------------------------------------ a server that fails
    @property
    def offline(self) -> bool:
        """Whether a recent call failed and calls are being skipped until the retry time."""
        return time.monotonic() < self._offline_until

    def _note_failure(self, what: str, error: BaseException) -> None:
        first = not self._failures
        self._failures[what] = self._failures.get(what, 0) + 1
        self._offline_until = time.monotonic() + self.retry_interval_s
        if first:
            reason = " ".join(str(error).split())[:200]
            rank_zero_warn(
                f"MLflow: {what} failed at {self._tracking_uri} ({type(error).__name__}: {reason}); training goes on, "
                f"metrics are kept and retried every {self.retry_interval_s:.0f} s"
            )

    def guarded(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run an MLflow client call unless offline; a failure is noted, never raised. True if it ran."""
        if self.offline:
            self._failures[what] = self._failures.get(what, 0) + 1
            return False
        try:
            call(*args, **kwargs)
        except Exception as error:
            self._note_failure(what, error)
            return False
        return True

    def _flush(self) -> bool:
        """Send the kept metrics in order; stop at the first failure. True when nothing is left."""
        while self._pending:
            metrics, step = self._pending[0]
            try:
                super().log_metrics(metrics, step)
            except Exception as error:
                self._note_failure("logging metrics", error)
                return False
            self._pending.pop(0)
        return True

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log once per key: without the ``epoch`` counter Lightning adds to every call (the step says it)."""
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if not metrics:
            return
        self._pending.append((metrics, step))
        if not self.offline:
            self._flush()

    def unlogged(self) -> dict[str, int]:
        """What never reached the server: ``{"metric updates": n, "<call>": n, ...}`` (empty when all did)."""
        out = {k: v for k, v in self._failures.items() if k != "logging metrics"}
        if self._pending:
            out["metric updates"] = len(self._pending)
        return out

    def set_final_status(self, status: str) -> None:
        """Status to end the run with, whatever Lightning passes to :meth:`finalize` (``killed``, ``failed``...)."""
        self._final_status = _STATUS.get(status.lower(), status.upper())

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """End the run with the status set by :meth:`set_final_status`, else Lightning's."""
        if self._final_status is not None:
            status = self._final_status
        self._offline_until = 0.0  # one last try for what was kept
        self._flush()
        try:
            super().finalize(_STATUS.get(status, status))
        except Exception as error:
            self._note_failure("ending the run", error)
        missing = self.unlogged()
        if missing:
            lost = ", ".join(f"{n} {what}" for what, n in missing.items())
            print(f"MLflow: not logged to {self._tracking_uri}: {lost}; results.json and the run folder have the run's numbers", file=sys.stderr)
