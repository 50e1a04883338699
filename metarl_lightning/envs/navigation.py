"""2-D point navigation from the MAML paper (Finn et al. 2017, section 5.2), vectorised in numpy.

The agent starts at the origin and must move to a goal drawn uniformly from ``[-0.5, 0.5]^2``; the
reward is the negative distance to the goal, actions (velocities) are clipped to ``[-0.1, 0.1]`` and
episodes are truncated after ``max_episode_steps`` (100 in the paper). The goal is not observed, so
a policy can only do well on a new goal by adapting: the smallest honest meta-RL problem, and fast
enough to learn inside the test suite.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metarl_lightning.envs.base import StepResult

GOAL_LOW, GOAL_HIGH = -0.5, 0.5
ACTION_LIMIT = 0.1


class Navigation2DVectorEnv:
    """``num_agents x envs_per_agent`` point-navigation environments stepped as one array.

    Args:
        num_agents: task-agents; each gets one goal via :meth:`set_tasks`.
        envs_per_agent: parallel episodes per agent.
        max_episode_steps: horizon (truncation).
    """

    observation_dim = 2
    action_dim = 2

    def __init__(self, num_agents: int, envs_per_agent: int, max_episode_steps: int = 100) -> None:
        self.num_agents = num_agents
        self.envs_per_agent = envs_per_agent
        self.max_episode_steps = max_episode_steps
        self._goals = np.zeros((self.num_envs, 2))
        self._positions = np.zeros((self.num_envs, 2))
        self._elapsed = np.zeros(self.num_envs, dtype=np.int64)

    @property
    def num_envs(self) -> int:
        """``num_agents * envs_per_agent``."""
        return self.num_agents * self.envs_per_agent

    @staticmethod
    def sample_tasks(num_tasks: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Goals uniform in ``[-0.5, 0.5]^2``; train and test draw from the same distribution."""
        return list(rng.uniform(GOAL_LOW, GOAL_HIGH, size=(num_tasks, 2)))

    def set_tasks(self, tasks: Sequence[np.ndarray]) -> None:
        """One goal per agent, repeated over its envs (agent-major layout)."""
        if len(tasks) != self.num_agents:
            raise ValueError(f"tasks: expected {self.num_agents} (one per agent), got {len(tasks)}")
        self._goals = np.repeat(np.asarray(tasks, dtype=np.float64), self.envs_per_agent, axis=0)

    def reset(self) -> np.ndarray:
        """All agents back at the origin."""
        self._positions = np.zeros((self.num_envs, 2))
        self._elapsed[:] = 0
        return self._positions.astype(np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        """Move by the clipped velocity; reward is the negative distance after the move."""
        self._positions = self._positions + np.clip(actions, -ACTION_LIMIT, ACTION_LIMIT)
        self._elapsed += 1
        distance = np.linalg.norm(self._positions - self._goals, axis=-1)
        reward = (-distance).astype(np.float32)
        truncated = self._elapsed >= self.max_episode_steps
        final_observation = self._positions.astype(np.float32)
        # Auto-reset finished envs; the caller bootstraps from final_observation.
        self._positions[truncated] = 0.0
        self._elapsed[truncated] = 0
        return StepResult(
            observation=self._positions.astype(np.float32),
            reward=reward,
            terminated=np.zeros(self.num_envs, dtype=bool),
            truncated=truncated,
            success=distance < 0.01,
            final_observation=final_observation,
        )

    def close(self) -> None:
        """Nothing to release."""
