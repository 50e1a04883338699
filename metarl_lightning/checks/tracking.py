"""The MLflow store answers before a run starts: a writable sqlite file, or a server within seconds.

MLflow's own client retries an unreachable server for minutes (7 retries with back-off, 120 s
timeouts) without a word; here a start fails within ``attempts x timeout`` seconds with one line,
and the client's per-request limits are lowered for the rest of the run (unless the user set them)
so a server that dies mid-run costs seconds per request, not minutes.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

from metarl_lightning.errors import ConfigError

FIELD = "trainer.logger.init_args.tracking_uri"
# Per request once the run is going (seconds / retries); see callbacks/mlflow_logger.py for buffering.
HTTP_TIMEOUT_S = "10"
HTTP_MAX_RETRIES = "1"


def sqlite_path(uri: str) -> str | None:
    """The database file of ``sqlite:///relative.db`` / ``sqlite:////absolute.db``, else ``None``."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///") :] or None


def check_tracking_uri(uri: str | None, attempts: int = 3, timeout_s: float = 3.0) -> None:
    """Fail with one line when the store cannot be written (sqlite) or reached (http/https).

    Raises:
        ConfigError: naming the URI and the reason.
    """
    if not uri:
        return
    path = sqlite_path(uri)
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.exists(path):
            if not os.path.isfile(path) or not os.access(path, os.R_OK | os.W_OK):
                raise ConfigError(f"{FIELD}: {uri}: {path} is not a writable file")
        elif not os.path.isdir(folder):
            raise ConfigError(f"{FIELD}: {uri}: the folder {folder} does not exist")
        elif not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{FIELD}: {uri}: cannot create the database in {folder} (not writable)")
        return
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return  # databricks, file stores...: MLflow's own checks
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    reason = ""
    for attempt in range(attempts):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                break
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            if attempt + 1 < attempts:
                time.sleep(1.0)
    else:
        raise ConfigError(f"{FIELD}: cannot reach the MLflow server {uri} ({reason}, {attempts} tries); start it or use sqlite:///mlflow.db")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES)
