"""Per-task reward ports for the most-stepped environments (reach, push, pick-place, door-open).

These envs call ``reward_utils.tolerance`` and ``np.linalg.norm`` directly from their own reward code,
which a subclass can only speed up by overriding that code. Each function below is the stock
``"v2"`` reward, line for line, with :func:`rewards.tolerance` / :func:`rewards.norm` swapped in
(same bits, same types); every other ``reward_function_version`` goes to the stock method.
``REWARD_PORTS[env_name]`` maps method names to these functions for ``classes.make_fast_class``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import numpy.typing as npt
from metaworld.envs.sawyer_door_v3 import SawyerDoorEnvV3
from metaworld.envs.sawyer_pick_place_v3 import SawyerPickPlaceEnvV3
from metaworld.envs.sawyer_push_v3 import SawyerPushEnvV3
from metaworld.envs.sawyer_reach_v3 import SawyerReachEnvV3
from metaworld.utils.reward_utils import hamacher_product

from metarl_lightning.envs.fast.rewards import norm, tolerance

_DOOR_OFFSET = np.array([-0.05, 0, 0])
_DOOR_HAND_OFFSET = np.array([0.05, 0.03, -0.01])


def reach_compute_reward(self: Any, actions: npt.NDArray[Any], obs: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    """``SawyerReachEnvV3.compute_reward``."""
    if self.reward_function_version != "v2":
        return SawyerReachEnvV3.compute_reward(self, actions, obs)
    assert self._target_pos is not None
    target = self._target_pos
    tcp_to_target = float(norm(self.tcp_center - target))
    in_place_margin = float(norm(self.hand_init_pos - target))
    in_place = tolerance(tcp_to_target, bounds=(0, 0.05), margin=in_place_margin, sigmoid="long_tail")
    return (10 * in_place, tcp_to_target, in_place)


def push_compute_reward(
    self: Any, action: npt.NDArray[Any], obs: npt.NDArray[np.float64]
) -> tuple[float, float, float, float, float, float]:
    """``SawyerPushEnvV3.compute_reward``."""
    if self.reward_function_version != "v2":
        return SawyerPushEnvV3.compute_reward(self, action, obs)
    assert self._target_pos is not None and self.obj_init_pos is not None
    obj = obs[4:7]
    tcp_opened = obs[3]
    tcp_to_obj = float(norm(obj - self.tcp_center))
    target_to_obj = float(norm(obj - self._target_pos))
    target_to_obj_init = float(norm(self.obj_init_pos - self._target_pos))
    in_place = tolerance(target_to_obj, bounds=(0, self.TARGET_RADIUS), margin=target_to_obj_init, sigmoid="long_tail")
    object_grasped = self._gripper_caging_reward(
        action,
        obj,
        object_reach_radius=0.01,
        obj_radius=0.015,
        pad_success_thresh=0.05,
        xz_thresh=0.005,
        high_density=True,
    )
    reward = 2 * object_grasped
    if tcp_to_obj < 0.02 and tcp_opened > 0:
        reward += 1.0 + reward + 5.0 * in_place
    if target_to_obj < self.TARGET_RADIUS:
        reward = 10.0
    return (reward, tcp_to_obj, tcp_opened, target_to_obj, object_grasped, in_place)


def pick_place_compute_reward(
    self: Any, action: npt.NDArray[Any], obs: npt.NDArray[np.float64]
) -> tuple[float, float, float, float, float, float]:
    """``SawyerPickPlaceEnvV3.compute_reward``."""
    if self.reward_function_version != "v2":
        return SawyerPickPlaceEnvV3.compute_reward(self, action, obs)
    assert self._target_pos is not None and self.obj_init_pos is not None
    tcp = self.tcp_center
    obj = obs[4:7]
    tcp_opened = obs[3]
    target = self._target_pos
    obj_to_target = float(norm(obj - target))
    tcp_to_obj = float(norm(obj - tcp))
    in_place_margin = norm(self.obj_init_pos - target)
    in_place = tolerance(obj_to_target, bounds=(0, 0.05), margin=in_place_margin, sigmoid="long_tail")
    object_grasped = self._gripper_caging_reward(action, obj)
    reward = hamacher_product(object_grasped, in_place)
    if tcp_to_obj < 0.02 and (tcp_opened > 0) and (obj[2] - 0.01 > self.obj_init_pos[2]):
        reward += 1.0 + 5.0 * in_place
    if obj_to_target < 0.05:
        reward = 10.0
    return (reward, tcp_to_obj, tcp_opened, obj_to_target, object_grasped, in_place)


def pick_place_gripper_caging_reward(self: Any, action: npt.NDArray[np.float32], obj_pos: npt.NDArray[Any], *_: Any, **__: Any) -> float:
    """``SawyerPickPlaceEnvV3._gripper_caging_reward`` (its arguments after ``obj_pos`` are unused there too)."""
    pad_success_margin = 0.05
    x_z_success_margin = 0.005
    obj_radius = 0.015
    tcp = self.tcp_center
    left_pad = self.get_body_com("leftpad")
    right_pad = self.get_body_com("rightpad")
    right_caging = tolerance(
        obj_pos[1] - right_pad[1],
        bounds=(obj_radius, pad_success_margin),
        margin=abs(abs(obj_pos[1] - self.init_right_pad[1]) - pad_success_margin),
        sigmoid="long_tail",
    )
    left_caging = tolerance(
        left_pad[1] - obj_pos[1],
        bounds=(obj_radius, pad_success_margin),
        margin=abs(abs(obj_pos[1] - self.init_left_pad[1]) - pad_success_margin),
        sigmoid="long_tail",
    )
    y_caging = hamacher_product(left_caging, right_caging)
    # The x-z distances stay in the stock's array form (cheap) rather than hand-simplified, so the
    # dot products see exactly the stock's inputs.
    tcp_xz = tcp + np.array([0.0, -tcp[1], 0.0])
    obj_xz = obj_pos + np.array([0.0, -obj_pos[1], 0.0])
    tcp_obj_norm_x_z = float(norm(tcp_xz - obj_xz))
    assert self.obj_init_pos is not None
    init_obj_x_z = self.obj_init_pos + np.array([0.0, -self.obj_init_pos[1], 0.0])
    init_tcp_x_z = self.init_tcp + np.array([0.0, -self.init_tcp[1], 0.0])
    tcp_obj_x_z_margin = norm(init_obj_x_z - init_tcp_x_z) - x_z_success_margin
    x_z_caging = tolerance(tcp_obj_norm_x_z, bounds=(0, x_z_success_margin), margin=tcp_obj_x_z_margin, sigmoid="long_tail")
    gripper_closed = min(max(0, action[-1]), 1)
    caging = hamacher_product(y_caging, x_z_caging)
    gripping = gripper_closed if caging > 0.97 else 0.0
    caging_and_gripping = hamacher_product(caging, gripping)
    return (caging_and_gripping + caging) / 2


def door_compute_reward(self: Any, actions: npt.NDArray[Any], obs: npt.NDArray[np.float64]) -> tuple[float, float, float, float]:
    """``SawyerDoorEnvV3.compute_reward`` with its ``_reward_pos`` inlined."""
    if self.reward_function_version != "v2":
        return SawyerDoorEnvV3.compute_reward(self, actions, obs)
    assert self._target_pos is not None, "`reset_model()` must be called before `compute_reward()`."
    theta = float(self.data.joint("doorjoint").qpos.item())
    reward_grab = SawyerDoorEnvV3._reward_grab_effort(actions)

    hand = obs[:3]
    door = obs[4:7] + _DOOR_OFFSET
    threshold = 0.12
    radius = norm(hand[:2] - door[:2])
    floor = 0.0 if radius <= threshold else 0.04 * np.log(radius - threshold) + 0.4
    above_floor = (
        1.0
        if hand[2] >= floor
        else tolerance(floor - hand[2], bounds=(0.0, 0.01), margin=floor / 2.0, sigmoid="long_tail")
    )
    in_place = tolerance(
        float(norm(hand - door - _DOOR_HAND_OFFSET)), bounds=(0, threshold / 2.0), margin=0.5, sigmoid="long_tail"
    )
    ready_to_open = hamacher_product(above_floor, in_place)
    door_angle = -theta
    opened = 0.2 * float(theta < -np.pi / 90.0) + 0.8 * tolerance(
        np.pi / 2.0 + np.pi / 6 - door_angle, bounds=(0, 0.5), margin=np.pi / 3.0, sigmoid="long_tail"
    )

    reward = sum((2.0 * hamacher_product(ready_to_open, reward_grab), 8.0 * opened))
    if abs(obs[4] - self._target_pos[0]) <= 0.08:
        reward = 10.0
    return reward, reward_grab, ready_to_open, opened


REWARD_PORTS: dict[str, dict[str, Callable[..., Any]]] = {
    "reach-v3": {"compute_reward": reach_compute_reward},
    "push-v3": {"compute_reward": push_compute_reward},
    "pick-place-v3": {
        "compute_reward": pick_place_compute_reward,
        "_gripper_caging_reward": pick_place_gripper_caging_reward,
    },
    "door-open-v3": {"compute_reward": door_compute_reward},
}
