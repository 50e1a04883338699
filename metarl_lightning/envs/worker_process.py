"""The worker side of :class:`~metarl_lightning.envs.workers.MetaWorldVectorEnv`: the shared-buffer
layout, a group of simulators stepped in one process, and the worker loop.

Runs in the worker processes (numpy and metaworld only, never torch) and, for ``num_workers=0``,
in the parent itself: the same :class:`EnvGroup` code in both modes, so both give identical
trajectories for identical actions.
"""

from __future__ import annotations

import pickle
import traceback
from multiprocessing.connection import Connection
from typing import Any, Sequence

import numpy as np
from metaworld.types import Task

from metarl_lightning.envs.base import METAWORLD_ACTION_DIM, METAWORLD_OBS_DIM
from metarl_lightning.envs.fast import env_class

# Per-env buffers shared by the parent and the workers: name -> (shape after the env axis, dtype).
# Each worker reads its rows of "action" and writes its rows of the others, so a step costs one
# byte each way through the pipe instead of pickled arrays.
FIELDS: dict[str, tuple[tuple[int, ...], type]] = {
    "action": ((METAWORLD_ACTION_DIM,), np.float32),
    "observation": ((METAWORLD_OBS_DIM,), np.float32),
    "reward": ((), np.float32),
    "terminated": ((), np.bool_),
    "truncated": ((), np.bool_),
    "success": ((), np.bool_),
    "final_observation": ((METAWORLD_OBS_DIM,), np.float32),
}
STEP, OK = b"s", b"o"  # the one-byte messages of the hot path; everything else is pickled


def shared_views(raw: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """Numpy views ``[n, ...]`` over shared ctypes buffers (no copy)."""
    return {
        key: np.frombuffer(raw[key], dtype=dt).reshape((n, *shape))
        for key, (shape, dt) in FIELDS.items()
    }


class EnvGroup:
    """A list of simulators stepped in one process; the unit of work of a worker.

    Reads actions from and writes results into ``buffers`` (rows of this group only), which are
    shared memory in a worker and plain arrays in-process: the same code in both modes.

    Args:
        classes: class name of each simulator.
        seeds: ``env.seed`` of each simulator.
        max_episode_steps: truncate episodes after this many steps.
        fast: use the fast subclasses of ``env_class``.
        terminate_on_success: end an episode (``terminated``) at the first success.
        buffers: ``FIELDS`` arrays with one row per simulator of this group.
        rotating: a task of another class replaces the simulator (otherwise metaworld's
            ``set_task`` refuses it).
    """

    def __init__(
        self,
        classes: Sequence[str],
        seeds: Sequence[int],
        max_episode_steps: int,
        fast: bool,
        terminate_on_success: bool,
        buffers: dict[str, np.ndarray],
        rotating: bool = False,
    ) -> None:
        self.rotating = rotating
        self.max_episode_steps = max_episode_steps
        self.fast = fast
        self.seeds = list(seeds)
        self.classes = list(classes)
        self.envs = [self._make(name, seed) for name, seed in zip(self.classes, self.seeds)]
        self.terminate_on_success = terminate_on_success
        self.buf = buffers
        self.steps = [0] * len(self.envs)

    def _make(self, name: str, seed: int) -> Any:
        env = env_class(name, fast=self.fast)(reward_function_version="v2")
        env.seed(seed)
        # The env itself refuses to step past max_path_length (500); lift it for longer
        # episodes. Shorter ones are cut by our own counter below.
        env.max_path_length = max(env.max_path_length, self.max_episode_steps)
        return env

    def reset(self, tasks: Sequence[Task]) -> None:
        """Set each env's task and reset it; writes ``buf["observation"]``.

        A task of another class than the env's replaces that simulator by a new one of the task's
        class (same seed): slots of a rotating MT meta-batch change class between iterations.
        """
        obs = self.buf["observation"]
        for i, task in enumerate(tasks):
            if self.rotating and task.env_name != self.classes[i]:
                self.envs[i].close()  # free the old simulator before building its replacement
                self.envs[i] = self._make(task.env_name, self.seeds[i])
                self.classes[i] = task.env_name
            env = self.envs[i]
            env.set_task(task)
            obs[i] = env.reset()[0]
            self.steps[i] = 0

    def step(self) -> None:
        """Step every env with ``buf["action"]``, auto-resetting finished ones (same task)."""
        b = self.buf
        actions = b["action"].copy()  # the env keeps no reference, but be safe against reuse
        for i, env in enumerate(self.envs):
            o, r, term, trunc, info = env.step(actions[i])
            self.steps[i] += 1
            succ = bool(info.get("success", False))
            term = bool(term) or (self.terminate_on_success and succ)
            # A terminated episode is not also reported truncated: no bootstrap at a true end.
            trunc = (bool(trunc) or self.steps[i] >= self.max_episode_steps) and not term
            b["reward"][i], b["success"][i] = r, succ
            b["terminated"][i], b["truncated"][i] = term, trunc
            b["final_observation"][i] = o
            if term or trunc:
                o = env.reset()[0]
                self.steps[i] = 0
            b["observation"][i] = o

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def worker_main(
    conn: Connection, raw: dict[str, Any], n: int, lo: int, hi: int, group_kwargs: dict[str, Any]
) -> None:
    """Worker loop: build the group over rows ``lo:hi`` of the shared buffers, then serve.

    Messages: ``STEP`` (answered ``OK``), or pickled ``("reset", tasks)`` / ``("close", None)``
    (answered ``("ok", None)``). Any exception is sent back as ``("error", traceback)`` so the
    parent raises it with the worker's stack; a vanished parent (EOF on the pipe) ends the loop.
    """
    group = None
    try:
        views = {k: v[lo:hi] for k, v in shared_views(raw, n).items()}
        group = EnvGroup(**group_kwargs, buffers=views)
        conn.send(("ok", None))
        while True:
            msg = conn.recv_bytes()
            if msg == STEP:
                group.step()
                conn.send_bytes(OK)
                continue
            cmd, payload = pickle.loads(msg)
            if cmd == "reset":
                group.reset(payload)
            elif cmd != "close":
                raise ValueError(f"unknown worker command {cmd!r}")
            conn.send(("ok", None))
            if cmd == "close":
                break
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except Exception:  # noqa: BLE001 - report any failure to the parent instead of dying silently
        try:
            conn.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if group is not None:
            group.close()
        conn.close()
