"""Context inputs for in-context adaptation (RL^2, Duan et al. 2016): what the agent did and got.

A meta-RL task whose goal is hidden can only be told apart by its rewards. An in-context agent
therefore sees, appended to every observation, the previous step's action, its reward and whether
that step ended an episode; its recurrent state carries this across the episodes of a trial.

Layout of the appended features (``context_dim(action_dim)`` floats), for step ``t``:

    [ action_{t-1} (clipped to the action box) * action_scale | reward_{t-1} * reward_scale | done_{t-1} ]

``done_{t-1}`` is 1 when step ``t - 1`` ended an episode, i.e. observation ``t`` is the first of a
new episode *inside* the trial. At a trial start (and so at every task change) all of it is zero.

The reward is scaled so the input is O(1): Meta-World's v2 rewards reach 10 per step (scale 0.1),
2-D navigation's are minus a distance of at most ~1.4 (scale 1). Meta-World+ reports RL^2 collapsing
when raw v1 rewards entered the input. ``action_scale`` 0 keeps the layout but drops what the action
says: the official protocol scores the *mean* action, so a policy trained on sampled previous
actions (mostly noise at std ~1) sees inputs unlike any in training in the evaluation episodes;
Meta-World's observation already shows where the hand went.

Training builds these features in the rollout collector (which also decides where trials start);
evaluation through ``metaworld.evaluation`` cannot, because that protocol gives ``eval_action`` no
reward, so :class:`ContextObservation` adds them on the eval envs. Both call
:func:`context_features`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

METAWORLD_CONTEXT_REWARD_SCALE = 0.1  # v2 rewards are in [0, 10] per step
NAV2D_CONTEXT_REWARD_SCALE = 1.0  # rewards are -distance, |r| <= ~1.4 in the goal square


def context_dim(action_dim: int) -> int:
    """Floats appended per observation: the action, the reward and the done flag."""
    return action_dim + 2


def context_features(
    action: np.ndarray,
    reward: np.ndarray,
    done: np.ndarray,
    reward_scale: float,
    action_limit: float = 1.0,
    action_scale: float = 1.0,
) -> np.ndarray:
    """The context inputs that the *next* observation carries, ``[N, A + 2]`` float32.

    Args:
        action: ``[N, A]`` the action just taken (clipped here to ``[-action_limit, action_limit]``,
            i.e. what the env was sent).
        reward: ``[N]`` the reward it earned.
        done: ``[N]`` bool, the step ended an episode (terminated or truncated).
        reward_scale: multiplies the reward (see the module docstring).
        action_limit: half-width of the action box.
        action_scale: multiplies the clipped action (0: the action inputs are always 0).
    """
    action = np.clip(np.asarray(action, dtype=np.float32), -action_limit, action_limit) * np.float32(action_scale)
    reward = np.asarray(reward, dtype=np.float32).reshape(-1, 1) * np.float32(reward_scale)
    done = np.asarray(done, dtype=np.float32).reshape(-1, 1)
    return np.concatenate([action, reward, done], axis=1)


class ContextObservation(gym.vector.VectorWrapper):
    """Appends :func:`context_features` to the observations of a Meta-World eval vector env.

    One trial per task, as ``metaworld.evaluation.metalearning_evaluation`` runs it: the context is
    zeroed when the protocol draws new tasks (``call("sample_tasks")``) and carried over everything
    else, the automatic resets between episodes and the ``reset()`` calls that start the
    adaptation and the evaluation phase on the same task (which mark a new episode: done = 1).

    Args:
        env: the vector env from ``make_eval_envs`` (synchronous, same-step autoreset).
        reward_scale: see :func:`context_features`.
        action_limit: half-width of the action box.
        action_scale: see :func:`context_features`.
    """

    def __init__(
        self, env: gym.vector.VectorEnv, reward_scale: float, action_limit: float = 1.0, action_scale: float = 1.0
    ) -> None:
        super().__init__(env)
        self.reward_scale = reward_scale
        self.action_limit = action_limit
        self.action_scale = action_scale
        action_dim = int(np.prod(env.single_action_space.shape))
        base = env.single_observation_space
        extra = context_dim(action_dim)
        low = np.concatenate([base.low, np.full(extra, -np.inf)]).astype(np.float64)
        high = np.concatenate([base.high, np.full(extra, np.inf)]).astype(np.float64)
        self.single_observation_space = gym.spaces.Box(low, high, dtype=np.float64)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, env.num_envs)
        self._context = np.zeros((env.num_envs, extra), dtype=np.float32)
        self._in_trial = False  # a step was taken since the last task change

    def _with_context(self, observations: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(observations, dtype=np.float64), self._context.astype(np.float64)], axis=1)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env; inside a trial the first observation says that a new episode starts."""
        observations, infos = self.env.reset(**kwargs)
        if self._in_trial:  # at a trial start nothing happened yet: the context stays zero
            self._context[:, -1] = 1.0
        return self._with_context(observations), infos

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step and attach this step's action, scaled reward and done to the next observations."""
        observations, rewards, terminated, truncated, infos = self.env.step(actions)
        self._context = context_features(
            actions, rewards, np.logical_or(terminated, truncated), self.reward_scale, self.action_limit, self.action_scale
        )
        self._in_trial = True
        return self._with_context(observations), rewards, terminated, truncated, infos

    # gymnasium's VectorWrapper forwards none of these; the protocol uses all of them.
    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Attribute ``name`` of every env."""
        return self.env.get_attr(name)

    def set_attr(self, name: str, values: Any) -> None:
        """Set attribute ``name`` of every env."""
        self.env.set_attr(name, values)

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Forward to the envs; a task change (``sample_tasks``) starts a new trial: zero context."""
        if name == "sample_tasks":
            self._context[:] = 0.0
            self._in_trial = False
        return self.env.call(name, *args, **kwargs)
