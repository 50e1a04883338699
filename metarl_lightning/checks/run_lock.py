"""One live fit per run folder: an advisory ``flock`` on ``<default_root_dir>/.fit.lock``.

The kernel drops the lock when the process dies (``kill -9`` included), so a stale lock never blocks
a resume. The file stays (removing it would race with a process opening it); its content names the
holder for the error message. Only the primary process of a launch takes it (DDP ranks that Lightning
or torchrun start carry ``LOCAL_RANK`` / ``RANK``).
"""

from __future__ import annotations

import os
import socket
from typing import IO

from metarl_lightning.errors import ConfigError

LOCK_FILE = ".fit.lock"
_held: list[IO[str]] = []  # open handles keep the locks for the life of the process


def is_primary_process() -> bool:
    """Not a rank > 0 started by a launcher (Lightning's, torchrun, SLURM)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def acquire_run_lock(folder: str, field: str = "trainer.default_root_dir") -> None:
    """Lock ``folder`` for this process, or fail naming the process that holds it."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    handle = open(path, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{field}: {folder} is in use by a running fit ({holder}); wait for it to end, or give this run its own {field}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held.append(handle)


def release_run_locks() -> None:
    """Release every lock this process holds (tests; a process's end releases them anyway)."""
    while _held:
        _held.pop().close()
