"""One fast subclass per Meta-World v3 environment, importable by name (so workers can unpickle it).

``FAST_CLASSES["pick-place-v3"]`` is ``FastSawyerPickPlaceEnvV3(FastSawyerMixin, SawyerPickPlaceEnvV3)``,
a module attribute of this module: pickle stores classes by module and qualified name, so a class
made with ``type()`` must also be reachable here under that name to travel to a subprocess.

Per-environment pieces: the 22 environments whose observation quaternion comes from
``Rotation.from_matrix(xmat).as_quat()`` get a ``_get_quat_objects`` reading the same ``xmat`` by id and
converting it with :func:`rotation.quat_from_xmat` (the table below was read off each stock
``_get_quat_objects``; the identity test checks every one); reach, push, pick-place and door-open
also get the reward ports of ``task_rewards.py``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import mujoco
import numpy as np
import numpy.typing as npt
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.sawyer_xyz_env import SawyerXYZEnv

from metarl_lightning.envs.fast.base import FastSawyerMixin
from metarl_lightning.envs.fast.rotation import quat_from_xmat
from metarl_lightning.envs.fast.task_rewards import REWARD_PORTS


class _XmatSource(NamedTuple):
    """Where a stock ``_get_quat_objects`` reads its rotation matrix."""

    kind: str  # "geom", "site" or "body": which MjData xmat array
    name: str
    zero_pad: bool = False  # stick-pull/-push append a zero quaternion for their second object


QUAT_FROM_XMAT: dict[str, _XmatSource] = {
    "coffee-pull-v3": _XmatSource("geom", "mug"),
    "coffee-push-v3": _XmatSource("geom", "mug"),
    "door-close-v3": _XmatSource("geom", "handle"),
    "door-open-v3": _XmatSource("geom", "handle"),
    "lever-pull-v3": _XmatSource("geom", "objGeom"),
    "peg-insert-side-v3": _XmatSource("site", "pegGrasp"),
    "pick-place-v3": _XmatSource("geom", "objGeom"),
    "pick-place-wall-v3": _XmatSource("geom", "objGeom"),
    "plate-slide-back-side-v3": _XmatSource("geom", "puck"),
    "plate-slide-back-v3": _XmatSource("geom", "puck"),
    "plate-slide-side-v3": _XmatSource("geom", "puck"),
    "plate-slide-v3": _XmatSource("geom", "puck"),
    "push-back-v3": _XmatSource("geom", "objGeom"),
    "push-v3": _XmatSource("geom", "objGeom"),
    "push-wall-v3": _XmatSource("geom", "objGeom"),
    "reach-v3": _XmatSource("geom", "objGeom"),
    "reach-wall-v3": _XmatSource("geom", "objGeom"),
    "shelf-place-v3": _XmatSource("geom", "objGeom"),
    "soccer-v3": _XmatSource("body", "soccer_ball"),
    "stick-pull-v3": _XmatSource("body", "stick", zero_pad=True),
    "stick-push-v3": _XmatSource("body", "stick", zero_pad=True),
    "sweep-into-v3": _XmatSource("geom", "objGeom"),
}

_OBJ_TYPE = {"geom": mujoco.mjtObj.mjOBJ_GEOM, "site": mujoco.mjtObj.mjOBJ_SITE, "body": mujoco.mjtObj.mjOBJ_BODY}
_XMAT_FIELD = {"geom": "geom_xmat", "site": "site_xmat", "body": "xmat"}
_ZERO_QUAT = np.zeros(4)


def _quat_method(source: _XmatSource, owner: type) -> Callable[[Any], npt.NDArray[np.float64]]:
    """A ``_get_quat_objects`` for ``source`` on class ``owner``, falling back to the stock one."""
    field = _XMAT_FIELD[source.kind]
    obj_type = _OBJ_TYPE[source.kind]
    cache_key = f"_fast_quat_id_{source.kind}_{source.name}"

    def _get_quat_objects(self: Any) -> npt.NDArray[np.float64]:
        """The object quaternion as the stock method computes it, without scipy's overhead."""
        index = self.__dict__.get(cache_key)
        if index is None:
            index = self.__dict__[cache_key] = mujoco.mj_name2id(self.model, obj_type, source.name)
        quat = quat_from_xmat(getattr(self.data, field)[index].tolist())
        if quat is None:  # not a clean rotation: scipy decides (projects or raises), as in stock
            return super(owner, self)._get_quat_objects()
        if source.zero_pad:
            return np.concatenate((quat, _ZERO_QUAT))
        return quat

    return _get_quat_objects


def _stock_definition(stock_cls: type, name: str) -> Any:
    """The stock class's own definition of ``name`` if it overrides ``SawyerXYZEnv``'s, else None."""
    for klass in stock_cls.__mro__:
        if klass is SawyerXYZEnv:
            return None
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def make_fast_class(env_name: str, stock_cls: type[SawyerXYZEnv]) -> type[SawyerXYZEnv]:
    """Build ``Fast<StockName>``: the mixin's methods, except those the stock class overrides itself.

    Args:
        env_name: the Meta-World name (selects the quaternion source, if any).
        stock_cls: the stock environment class, from ``ALL_V3_ENVIRONMENTS``.

    Returns:
        A subclass of ``stock_cls`` whose ``__module__``/``__qualname__`` point at this module.
    """
    name = f"Fast{stock_cls.__name__}"
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"Bit-identical fast version of ``{stock_cls.__name__}`` ({env_name}).",
        "_stock_class": stock_cls,
    }
    for attr in vars(FastSawyerMixin):
        if attr.startswith("__"):
            continue
        own = _stock_definition(stock_cls, attr)
        if own is not None:  # e.g. pick-place's own _gripper_caging_reward: the stock one wins
            namespace[attr] = own
    # Line-for-line ports of a few envs' own reward code (task_rewards.py) replace the stock ones.
    namespace.update(REWARD_PORTS.get(env_name, {}))
    cls = type(name, (FastSawyerMixin, stock_cls), namespace)
    if env_name in QUAT_FROM_XMAT:
        cls._get_quat_objects = _quat_method(QUAT_FROM_XMAT[env_name], cls)
    return cls


FAST_CLASSES: dict[str, type[SawyerXYZEnv]] = {}
for _env_name, _stock_cls in ALL_V3_ENVIRONMENTS.items():
    _cls = make_fast_class(_env_name, _stock_cls)
    globals()[_cls.__qualname__] = _cls
    FAST_CLASSES[_env_name] = _cls
