"""Bounds that protect the machine: the run folder is writable, the config fits in memory.

The memory estimate is a *lower bound* from the config alone, before any env or tensor exists:
the rollout storage (support + query, training and evaluation sets) and the simulators. A config
whose lower bound exceeds the memory available is refused with both numbers; one that passes can
still need more for the learner's graph (docs/benchmarks.md has measured peaks per config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from metarl_lightning.errors import ConfigError

# One Meta-World env with its MuJoCo model and data (measured, DESIGN.md).
METAWORLD_ENV_BYTES = 27 * 2**20
# Per step and env: observation, action and its pre-drawn noise, then log-prob, value, next value,
# reward, terminated, truncated, reset, advantage, return (float32 / bool, counted as 4 bytes).
_SCALARS_PER_STEP = 9


def check_writable_dir(path: str, field: str) -> None:
    """``path`` is (or can become) a directory this process can write into.

    Creates the folder when it is missing (a new empty folder changes nothing that existed).

    Raises:
        ConfigError: ``<field>: <path> ...`` naming why not (a file, read-only, no permission).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{field}: {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{field}: cannot create {path} ({error.strerror or error})") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path} is not writable")


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else ``None`` (the bound is then not checked)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class MemoryEstimate:
    """Lower bound of one rank's memory, by part (bytes)."""

    train_storage: int
    eval_storage: int
    train_envs: int
    eval_envs: int

    @property
    def total(self) -> int:
        return self.train_storage + self.eval_storage + self.train_envs + self.eval_envs


def estimate_memory(
    *,
    train_agents: int,
    eval_agents: int,
    envs_per_task: int,
    train_steps: int,
    eval_steps: int,
    observation_dim: int,
    action_dim: int,
    env_bytes: int,
    fit: bool,
) -> MemoryEstimate:
    """Rollout storage and simulators of one rank.

    Args:
        train_agents / eval_agents: task agents of this rank in a training / evaluation meta-batch.
        envs_per_task: envs per agent.
        train_steps / eval_steps: steps per env in one support (or query) rollout.
        observation_dim / action_dim: sizes of one step.
        env_bytes: bytes per env (``0`` for the numpy navigation envs).
        fit: count the training set (``validate``/``test`` build the evaluation set only).
    """
    per_step = 4 * (observation_dim + 2 * action_dim + _SCALARS_PER_STEP)
    # Support and query rollouts are held together.
    train = 2 * train_agents * envs_per_task * train_steps * per_step if fit else 0
    evaluation = 2 * eval_agents * envs_per_task * eval_steps * per_step
    return MemoryEstimate(
        train_storage=train,
        eval_storage=evaluation,
        train_envs=train_agents * envs_per_task * env_bytes if fit else 0,
        eval_envs=eval_agents * envs_per_task * env_bytes,
    )


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def check_memory(estimate: MemoryEstimate, available: int | None) -> None:
    """Refuse a config whose lower bound does not fit in ``available`` bytes, naming the fields."""
    if available is None or estimate.total <= available:
        return
    parts = {
        "rollout storage (data.meta_batch_size x data.rollouts_per_task x data.max_episode_steps)": estimate.train_storage,
        "evaluation storage (data.num_eval_tasks x data.eval_rollouts_per_task x data.max_episode_steps)": estimate.eval_storage,
        "training envs (data.meta_batch_size x data.envs_per_task)": estimate.train_envs,
        "evaluation envs (data.num_eval_tasks x data.envs_per_task)": estimate.eval_envs,
    }
    largest = max(parts, key=parts.__getitem__)
    raise ConfigError(
        f"data: this config needs at least {_gb(estimate.total)} per process, {_gb(available)} is available; "
        f"the largest part is the {largest}: {_gb(parts[largest])}"
    )
