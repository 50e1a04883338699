"""The contract between the rollout collector and any batch of task environments.

A ``TaskVectorEnv`` holds ``num_agents * envs_per_agent`` environments laid out agent-major: slot
``k * envs_per_agent + e`` is environment ``e`` of task-agent ``k``. ``set_tasks`` gives agent ``k``
its task (every one of its envs runs that task). ``step`` auto-resets finished environments and
hands back the final observation separately, so the collector can bootstrap a truncated episode
without another round trip to the workers.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np

# Meta-World's observation and action sizes (every v3 class): here, where the data module can read
# them without importing metaworld, as the env workers do.
METAWORLD_OBS_DIM = 39
METAWORLD_ACTION_DIM = 4


class StepResult(NamedTuple):
    """Result of stepping all ``N`` environments once.

    Attributes:
        observation: ``[N, obs_dim]`` float32; for a finished env, the first observation of its
            next episode (it was reset automatically).
        reward: ``[N]`` float32.
        terminated: ``[N]`` bool, true terminal state (no bootstrap).
        truncated: ``[N]`` bool, time limit (bootstrap from ``final_observation``).
        success: ``[N]`` bool, Meta-World's ``info['success']`` at this step (False if undefined).
        final_observation: ``[N, obs_dim]`` float32; the last observation of the episode for a
            finished env, equal to ``observation`` otherwise.
    """

    observation: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    success: np.ndarray
    final_observation: np.ndarray


class TaskVectorEnv(Protocol):
    """A batch of environments, one group of ``envs_per_agent`` per task-agent."""

    num_agents: int
    envs_per_agent: int
    observation_dim: int
    action_dim: int
    max_episode_steps: int

    @property
    def num_envs(self) -> int:
        """``num_agents * envs_per_agent``."""

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """Assign one task per agent (``len(tasks) == num_agents``); takes effect at next reset."""

    def reset(self) -> np.ndarray:
        """Reset every env; returns ``[N, obs_dim]`` float32 observations."""

    def step(self, actions: np.ndarray) -> StepResult:
        """Step every env with ``[N, action_dim]`` actions (already clipped to the action box)."""

    def close(self) -> None:
        """Release workers and simulators."""
