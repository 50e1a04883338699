"""Starting env worker processes: without re-running the main script, and early.

Kept free of numpy, torch and metaworld imports so that ``cli.py`` can call
:func:`prestart_fork_server` before it imports torch and Lightning (docs/benchmarks.md, "Start-up").
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
from multiprocessing import forkserver
from typing import Iterator

# What every env worker imports (metaworld, MuJoCo, gymnasium, numpy and this package's env code).
WORKER_MODULE = "metarl_lightning.envs.worker_process"


@contextlib.contextmanager
def main_script_hidden() -> Iterator[None]:
    """Start processes without multiprocessing re-running the user's main script in them.

    With ``forkserver``/``spawn``, multiprocessing imports the parent's ``__main__`` file (or
    module, for ``python -m``) in the fork server or child, so that targets defined there can be
    found. The workers' target and arguments live in this package, so that import only costs: for
    ``cli.py`` it is torch, Lightning and MLflow, ~8-10 s of a fit's start-up (docs/benchmarks.md).
    Not thread-safe: it edits the ``__main__`` module for the duration of the block.
    """
    main = sys.modules.get("__main__")
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if main is not None and key in main.__dict__}
    if "__spec__" in saved:
        main.__spec__ = None  # `python -m`: multiprocessing would import the module by name
    if "__file__" in saved:
        del main.__file__
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def prestart_fork_server() -> bool:
    """Start multiprocessing's fork server now, with the env workers' modules imported in it.

    The fork server is otherwise started by the first env worker, and every worker then imports
    metaworld and MuJoCo itself (~0.5 s) before it can build a simulator. Started here (``cli.py``
    calls this before it imports torch and Lightning), the server does those imports on the other
    core while the main process imports, and each worker is forked from it with them done. Does not
    wait for the server; harmless if it is never used (it exits with this process).

    Returns:
        Whether a fork server was started (False where the platform has none, or one is running).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return False
    server = forkserver._forkserver  # the process-wide server that every forkserver context uses
    if server._forkserver_pid is not None:
        return False
    forkserver.set_forkserver_preload([WORKER_MODULE])
    with main_script_hidden():
        forkserver.ensure_running()
    return True
