"""The fast step shared by all 50 v3 environments: a mixin over ``SawyerXYZEnv``'s per-step methods.

Each method here replaces a ``SawyerXYZEnv`` method with one that computes the same bits with fewer
Python-level numpy calls; the per-environment pieces (object quaternions) live in ``classes.py``.
Rules that keep the results bit-identical to the stock classes:

- same floating-point operations in the same order, on the same types (numpy scalars where the stock
  code has numpy scalars: ``pow``, ``dot`` and 0-d array results differ from Python's in the last bit);
- views stay views: ``get_body_com`` and friends still return live rows of ``data.xpos``, because
  stock code keeps some of them (``init_left_pad``) and relies on them moving with the simulation;
- anything unusual (a list action, a task not set, odd observation layouts) is handed to the stock
  method, so its results and its errors are the stock ones.

Only integer MuJoCo ids are cached on the instance (never array views), so a pickled and restored
env, which gets a fresh ``MjData``, reads the live arrays.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, SupportsFloat

import mujoco
import numpy as np
import numpy.typing as npt
from metaworld.sawyer_xyz_env import SawyerXYZEnv
from metaworld.utils import reward_utils

from metarl_lightning.envs.fast.rewards import norm, tolerance

_XZ = [0, 2]
# SawyerXYZEnv.set_xyz_action assigns np.array([1, 0, 1, 0]) to every mocap quaternion.
_MOCAP_QUAT = np.array([1, 0, 1, 0])


class _Ids(NamedTuple):
    """MuJoCo ids the fast path reads by index instead of by name."""

    hand: int
    right_claw: int
    left_claw: int
    right_effector: int
    left_effector: int
    left_pad_geom: int
    right_pad_geom: int


# Compiled MuJoCo models by XML path, per process: compiling the XML is ~0.2 s, 90+% of building an
# env, and every env of one class compiles the same file. Envs get copies (mj_copyModel, ~0.02 s),
# which equal a fresh compile array for array, so each env can still move its own bodies and sites.
_COMPILED_MODELS: dict[str, mujoco.MjModel] = {}


def compiled_model(path: str) -> mujoco.MjModel:
    """A new ``MjModel`` of the XML at ``path``: a copy of this process's compiled one."""
    template = _COMPILED_MODELS.get(path)
    if template is None:
        template = _COMPILED_MODELS[path] = mujoco.MjModel.from_xml_path(path)
    return copy.copy(template)


class FastSawyerMixin:
    """Bit-identical, faster replacements for ``SawyerXYZEnv``'s per-step methods.

    Mixed in before a stock environment class by ``classes.make_fast_class``, which drops any method
    the stock class overrides itself (e.g. pick-place's own ``_gripper_caging_reward``).
    """

    # Set on the instance by SawyerXYZEnv / MujocoEnv; declared for type checkers.
    model: mujoco.MjModel
    data: mujoco.MjData
    _stock_class: type[SawyerXYZEnv]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Build the stock environment; ``args``/``kwargs`` are the stock class's own."""
        super().__init__(*args, **kwargs)
        # SawyerXYZEnv names the task after type(self); metaworld.evaluation maps task names back
        # through the stock class names, so the fast class must report the stock one.
        self.task_name = self._stock_class.__name__

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        """gymnasium's ``MujocoEnv._initialize_simulation`` with the model copied, not compiled again."""
        model = compiled_model(self.fullpath)
        # As gymnasium: only grow the offscreen framebuffer, never shrink it below the XML's size.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    @property
    def _fast_ids(self) -> _Ids:
        """Ids by name, looked up once per instance (the stock code looks them up every step)."""
        ids = self.__dict__.get("_fast_ids_cache")
        if ids is None:
            m = self.model

            def find(kind: mujoco.mjtObj, name: str) -> int:
                return mujoco.mj_name2id(m, kind, name)

            body, site, geom = mujoco.mjtObj.mjOBJ_BODY, mujoco.mjtObj.mjOBJ_SITE, mujoco.mjtObj.mjOBJ_GEOM
            ids = _Ids(
                hand=find(body, "hand"),
                right_claw=find(body, "rightclaw"),
                left_claw=find(body, "leftclaw"),
                right_effector=find(site, "rightEndEffector"),
                left_effector=find(site, "leftEndEffector"),
                left_pad_geom=find(geom, "leftpad_geom"),
                right_pad_geom=find(geom, "rightpad_geom"),
            )
            self.__dict__["_fast_ids_cache"] = ids
        return ids

    @property
    def tcp_center(self) -> npt.NDArray[Any]:
        """Midpoint of the two finger sites, as ``(right + left) / 2.0`` like the stock property."""
        ids = self._fast_ids
        site_xpos = self.data.site_xpos
        return (site_xpos[ids.right_effector] + site_xpos[ids.left_effector]) / 2.0

    def touching_object(self, object_geom_id: int) -> bool:
        """Whether both finger pads push on the object: the stock test, on the contact arrays at once.

        The stock version iterates ``data.contact`` by index until IndexError (~100 us a scan).
        Matching contacts are found with one vectorised comparison; their forces are then summed one
        by one from an int 0 in contact order, as the stock ``sum(...)`` does, so the result (and
        its type: ``bool`` or ``np.bool_``) is the same.
        """
        data = self.data
        if data.ncon == 0:
            return False
        ids = self._fast_ids
        contact = data.contact
        g1, g2 = contact.geom1, contact.geom2
        on_object = (g1 == object_geom_id) | (g2 == object_geom_id)
        left = np.flatnonzero(on_object & ((g1 == ids.left_pad_geom) | (g2 == ids.left_pad_geom)))
        right = np.flatnonzero(on_object & ((g1 == ids.right_pad_geom) | (g2 == ids.right_pad_geom)))
        efc_force, efc_address = data.efc_force, contact.efc_address
        left_force: Any = 0
        for i in left:
            left_force = left_force + efc_force[efc_address[i]]
        right_force: Any = 0
        for i in right:
            right_force = right_force + efc_force[efc_address[i]]
        return 0 < left_force and 0 < right_force

    def set_xyz_action(self, action: npt.NDArray[Any]) -> None:
        """Move the mocap by the clipped, scaled action: the stock arithmetic on the same dtypes."""
        action = np.clip(action, -1, 1)
        pos_delta = action * self.action_scale  # float32 * Python float stays float32 (NEP 50)
        data = self.data
        new_mocap_pos = data.mocap_pos + pos_delta[None]
        new_mocap_pos[0, :] = np.clip(new_mocap_pos[0, :], self.mocap_low, self.mocap_high)
        data.mocap_pos[:] = new_mocap_pos
        data.mocap_quat[:] = _MOCAP_QUAT

    def _get_curr_obs_combined_no_goal(self) -> npt.NDArray[np.float64]:
        """Hand position, gripper opening and object pose(s): 18 floats, written in place.

        Replaces ``np.split``/``np.hstack`` assembly (~20 us) by slice writes into one buffer. Any
        layout other than equal numbers of 3-vectors and 4-vectors fitting 14 slots goes to the
        stock method, which raises for the invalid ones.
        """
        obj_pos = self._get_pos_objects()
        obj_quat = self._get_quat_objects()
        n_pos, n_quat = len(obj_pos), len(obj_quat)
        n_obj = n_pos // 3
        if n_pos % 3 or n_quat != 4 * n_obj or n_pos + n_quat > self._obs_obj_max_len:
            return super()._get_curr_obs_combined_no_goal()  # type: ignore[misc]
        ids = self._fast_ids
        xpos = self.data.xpos
        claws = xpos[ids.right_claw] - xpos[ids.left_claw]
        # np.clip(norm / 0.1, 0.0, 1.0) as min/max (NaN passes through both the same way).
        opening = min(max(norm(claws) / 0.1, 0.0), 1.0)
        obs = np.zeros(4 + self._obs_obj_max_len)
        obs[0:3] = xpos[ids.hand]
        obs[3] = opening
        if n_obj == 1:
            obs[4:7] = obj_pos
            obs[7:11] = obj_quat
        else:
            for k in range(n_obj):
                obs[4 + 7 * k : 7 + 7 * k] = obj_pos[3 * k : 3 * k + 3]
                obs[7 + 7 * k : 11 + 7 * k] = obj_quat[4 * k : 4 * k + 4]
        return obs

    def _get_obs(self) -> npt.NDArray[np.float64]:
        """Current frame, previous frame and goal (zeros when partially observable), concatenated."""
        pos_goal = self._get_pos_goal()
        curr_obs = self._get_curr_obs_combined_no_goal()
        obs = np.concatenate((curr_obs, self._prev_obs, pos_goal))
        if self._partially_observable:
            # Stock: np.zeros_like(pos_goal) in the concatenation; same dtype, same zeros.
            obs[len(curr_obs) + len(self._prev_obs) :] = 0
        self._prev_obs = curr_obs
        return obs

    def step(
        self, action: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float64], SupportsFloat, bool, bool, dict[str, Any]]:
        """``SawyerXYZEnv.step`` with the physics called directly; same checks, same results.

        A non-array or non-(4,) action, an unset task, or a simulator instability is handed to the
        stock ``step``, which raises or answers exactly as it always does.
        """
        if (
            type(action) is not np.ndarray
            or action.shape != (4,)
            or not self._set_task_called
            or self._did_see_sim_exception
        ):
            return super().step(action)  # type: ignore[misc]
        self.set_xyz_action(action[:3])
        if self.curr_path_length >= self.max_path_length:
            raise ValueError("You must reset the env manually once truncate==True")
        model, data = self.model, self.data
        if model.nu != 2:  # the stock do_simulation raises its own error for this
            self.do_simulation([action[-1], -action[-1]], n_frames=self.frame_skip)
        data.ctrl[:] = (action[-1], -action[-1])
        mujoco.mj_step(model, data, nstep=self.frame_skip)
        # gymnasium's MujocoEnv does this after every step: force-related fields need it.
        mujoco.mj_rnePostConstraint(model, data)
        self.curr_path_length += 1

        # Running the simulator can move sites; the stock step re-places the target sites.
        for site in self._target_site_config:
            self._set_pos_site(*site)

        mujoco.mj_forward(model, data)
        space = self.sawyer_observation_space
        obs = np.clip(self._get_obs(), a_max=space.high, a_min=space.low, dtype=np.float64)
        self._last_stable_obs = obs
        reward, info = self.evaluate_state(obs, action)
        truncate = self.curr_path_length == self.max_path_length
        return np.array(obs, dtype=np.float64), reward, False, truncate, info

    def _gripper_caging_reward(
        self,
        action: npt.NDArray[np.float32],
        obj_pos: npt.NDArray[Any],
        obj_radius: float,
        pad_success_thresh: float,
        object_reach_radius: float,
        xz_thresh: float,
        desired_gripper_effort: float = 1.0,
        high_density: bool = False,
        medium_density: bool = False,
    ) -> float:
        """``SawyerXYZEnv._gripper_caging_reward`` with scalar tolerances; see the stock docstring."""
        assert self.obj_init_pos is not None, "`obj_init_pos` must be initialized before calling this function."
        if high_density and medium_density:
            raise ValueError("Can only be either high_density or medium_density")
        pad_ys = (self.get_body_com("leftpad")[1], self.get_body_com("rightpad")[1])
        bounds = (obj_radius, pad_success_thresh)
        # Stock: pad_to_obj_lr = np.abs(pad_y_lr - obj_pos[1]) etc., elementwise, same values.
        caging_lr = [
            tolerance(
                abs(pad_y - obj_pos[1]),
                bounds=bounds,
                margin=abs(abs(pad_y - self.obj_init_pos[1]) - pad_success_thresh),
                sigmoid="long_tail",
            )
            for pad_y in pad_ys
        ]
        caging_y = reward_utils.hamacher_product(*caging_lr)

        tcp = self.tcp_center
        caging_xz_margin = norm(self.obj_init_pos[_XZ] - self.init_tcp[_XZ])
        caging_xz_margin -= xz_thresh
        caging_xz = tolerance(
            norm(tcp[_XZ] - obj_pos[_XZ]),
            bounds=(0, xz_thresh),
            margin=caging_xz_margin,
            sigmoid="long_tail",
        )

        gripper_closed = min(max(0, action[-1]), desired_gripper_effort) / desired_gripper_effort
        caging = reward_utils.hamacher_product(caging_y, float(caging_xz))
        gripping = gripper_closed if caging > 0.97 else 0.0
        caging_and_gripping = reward_utils.hamacher_product(caging, gripping)

        if high_density:
            caging_and_gripping = (caging_and_gripping + caging) / 2
        if medium_density:
            tcp = self.tcp_center
            tcp_to_obj = norm(obj_pos - tcp)
            tcp_to_obj_init = norm(self.obj_init_pos - self.init_tcp)
            reach_margin = abs(tcp_to_obj_init - object_reach_radius)
            reach = tolerance(
                tcp_to_obj,
                bounds=(0, object_reach_radius),
                margin=reach_margin,
                sigmoid="long_tail",
            )
            caging_and_gripping = (caging_and_gripping + float(reach)) / 2
        return caging_and_gripping

