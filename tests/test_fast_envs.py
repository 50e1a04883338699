"""The fast Meta-World classes against the stock ones: bit-identical steps, resets and helpers.

The main test runs every v3 environment twice (stock and fast class) with the same seed and the same
actions (the env's scripted policy, so grasps and contacts really happen, mixed with random and
out-of-range actions) for 300 steps with a 100-step limit, i.e. through three truncations and resets
with newly drawn goals, and requires everything a caller sees to be exactly equal.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import ENV_POLICY_MAP
from metaworld.sawyer_xyz_env import SawyerXYZEnv
from metaworld.types import Task
from metaworld.utils import reward_utils
from scipy.spatial.transform import Rotation

import metarl_lightning.envs.fast as fast_envs
from metarl_lightning.envs.fast import env_class
from metarl_lightning.envs.fast.rewards import norm, tolerance
from metarl_lightning.envs.fast.rotation import quat_from_xmat

ENV_NAMES = sorted(ALL_V3_ENVIRONMENTS)
STEPS = 300
LIMIT = 100  # short episodes, so the truncation -> reset path runs three times per env

pytestmark = pytest.mark.skipif(
    not fast_envs.fast_envs_verified(), reason="fast envs are only enabled for the verified versions"
)


def make_env(cls: type[SawyerXYZEnv], env_name: str, partially_observable: bool) -> SawyerXYZEnv:
    """An env with a task set that draws a fresh seeded goal at every reset (as MT1 training does)."""
    env = cls()
    data = {"env_cls": ALL_V3_ENVIRONMENTS[env_name], "rand_vec": np.zeros(6), "partially_observable": partially_observable}
    env.set_task(Task(env_name=env_name, data=pickle.dumps(data)))
    # set_task freezes the goal; unfreeze it so that each reset exercises reset_model's sampling.
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.seed(7)
    env.max_path_length = LIMIT
    return env


def assert_same(stock: Any, fast: Any, where: str) -> None:
    """Exactly equal values (NaN-aware) of exactly the same type, recursing into dicts and tuples."""
    assert type(stock) is type(fast), f"{where}: type {type(stock).__name__} != {type(fast).__name__}"
    if isinstance(stock, dict):
        assert list(stock) == list(fast), f"{where}: keys {list(stock)} != {list(fast)}"
        for key in stock:
            assert_same(stock[key], fast[key], f"{where}[{key!r}]")
    elif isinstance(stock, (tuple, list)):
        assert len(stock) == len(fast), f"{where}: length {len(stock)} != {len(fast)}"
        for i, (s, f) in enumerate(zip(stock, fast)):
            assert_same(s, f, f"{where}[{i}]")
    elif isinstance(stock, np.ndarray):
        assert stock.dtype == fast.dtype and stock.shape == fast.shape, where
        assert np.array_equal(stock, fast, equal_nan=True), f"{where}: max abs diff {np.nanmax(np.abs(stock - fast))}"
    else:
        assert stock == fast or (stock != stock and fast != fast), f"{where}: {stock!r} != {fast!r}"


@pytest.mark.parametrize("env_name", ENV_NAMES)
def test_fast_env_is_bit_identical(env_name: str) -> None:
    fast_cls = env_class(env_name, fast=True)
    stock_cls = ALL_V3_ENVIRONMENTS[env_name]
    assert fast_cls is not stock_cls and issubclass(fast_cls, stock_cls)
    partially_observable = ENV_NAMES.index(env_name) % 2 == 0  # half of the envs show the goal
    stock = make_env(stock_cls, env_name, partially_observable)
    fast = make_env(fast_cls, env_name, partially_observable)
    assert fast.task_name == stock.task_name  # metaworld.evaluation maps tasks by this name

    stock_obs, stock_info = stock.reset()
    fast_obs, fast_info = fast.reset()
    assert_same((stock_obs, stock_info), (fast_obs, fast_info), "reset")
    policy = ENV_POLICY_MAP[env_name]()
    rng = np.random.default_rng(ENV_NAMES.index(env_name))
    truncations = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scripted policies warn about their own gains
        for t in range(STEPS):
            if rng.random() < 0.7:
                action = policy.get_action(stock_obs).astype(np.float32)
            else:  # beyond [-1, 1] on purpose: the clipping paths must agree too
                action = rng.uniform(-1.5, 1.5, 4).astype(np.float32)
            stock_out, fast_out = stock.step(action), fast.step(action)
            for name, s, f in zip(("obs", "reward", "terminated", "truncated", "info"), stock_out, fast_out):
                assert_same(s, f, f"{env_name} step {t} {name}")
            stock_obs = stock_out[0]
            if stock_out[3]:
                truncations += 1
                if t == STEPS - 1:  # stepping past the limit is an error in both
                    for env in (stock, fast):
                        with pytest.raises(ValueError, match="reset"):
                            env.step(action)
                stock_obs, stock_info = stock.reset()
                fast_obs, fast_info = fast.reset()
                assert_same((stock_obs, stock_info), (fast_obs, fast_info), f"{env_name} reset after {t}")
    assert truncations == STEPS // LIMIT


def test_quaternion_port_matches_scipy_on_random_rotations() -> None:
    matrices = Rotation.random(100_000, rng=np.random.default_rng(0)).as_matrix()
    expected = Rotation.from_matrix(matrices).as_quat()
    got = np.array([quat_from_xmat(m) for m in matrices.reshape(-1, 9).tolist()])
    assert np.array_equal(got, expected)  # bit for bit, no tolerance
    one = matrices[0]
    assert np.array_equal(quat_from_xmat(one.ravel().tolist()), Rotation.from_matrix(one).as_quat())


@pytest.mark.parametrize(
    "matrix",
    [np.eye(3) * 1.001, np.diag([1.0, 1.0, -1.0]), np.full((3, 3), np.nan), np.zeros((3, 3))],
    ids=["not-orthonormal", "reflection", "nan", "singular"],
)
def test_quaternion_port_hands_odd_matrices_back_to_scipy(matrix: np.ndarray) -> None:
    assert quat_from_xmat(matrix.ravel().tolist()) is None


def test_fast_quaternion_falls_back_to_scipy_errors() -> None:
    env = env_class("reach-v3", fast=True)()
    env.data.geom("objGeom").xmat[:] = np.diag([1.0, 1.0, -1.0]).ravel()  # left-handed frame
    with pytest.raises(ValueError, match="determinant"):
        env._get_quat_objects()


def test_scalar_tolerance_matches_stock() -> None:
    rng = np.random.default_rng(1)
    xs = np.concatenate([rng.normal(0, 0.3, 2000), [0.0, 0.05, -0.0, np.nan, np.inf]])
    for x in xs:
        for value in (float(x), np.float64(x)):
            for bounds, margin in (((0, 0.05), 0.3), ((0.015, 0.05), np.float64(0.02)), ((0, 0.1), 0.0), ((0, 0), 1.0)):
                expected = reward_utils.tolerance(value, bounds=bounds, margin=margin, sigmoid="long_tail")
                assert_same(expected, tolerance(value, bounds=bounds, margin=margin, sigmoid="long_tail"), f"x={value!r}")
    assert_same(reward_utils.tolerance(0.3, margin=0.5), tolerance(0.3, margin=0.5), "gaussian passes through")
    with pytest.raises(ValueError):
        tolerance(0.1, bounds=(0.0, 0.1), margin=-1.0, sigmoid="long_tail")
    v = rng.normal(size=3)
    assert_same(np.linalg.norm(v), norm(v), "norm")


def test_env_class_switch_and_errors() -> None:
    assert env_class("reach-v3", fast=False) is ALL_V3_ENVIRONMENTS["reach-v3"]
    with pytest.raises(ValueError, match="unknown Meta-World environment"):
        env_class("reach-v2")


def test_unverified_versions_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_envs, "VERIFIED_VERSIONS", {"metaworld": "0.0.0", "mujoco": "0.0.0"})
    monkeypatch.setattr(fast_envs, "_warned", False)
    with pytest.warns(RuntimeWarning, match="stock classes"):
        assert env_class("push-v3") is ALL_V3_ENVIRONMENTS["push-v3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        assert env_class("reach-v3") is ALL_V3_ENVIRONMENTS["reach-v3"]


def test_fast_env_pickles_and_loads_in_a_fresh_process() -> None:
    envs = [make_env(cls, "pick-place-v3", False) for cls in (ALL_V3_ENVIRONMENTS["pick-place-v3"], env_class("pick-place-v3"))]
    for env in envs:
        env.reset()
    blob = pickle.dumps(envs[1])
    # Metaworld's pickling keeps qpos/qvel but not all of MjData, so a restored env is compared with
    # a restored stock env, not with the original.
    stock, fast = pickle.loads(pickle.dumps(envs[0])), pickle.loads(blob)
    assert type(fast) is type(envs[1])
    action = np.array([0.3, -0.2, 0.5, 1.0], np.float32)
    assert_same(stock.step(action), fast.step(action), "restored")
    # A worker process sees only the pickle: the class must be importable there by its name.
    code = "import pickle, sys, numpy as np; env = pickle.loads(sys.stdin.buffer.read()); env.step(np.zeros(4, np.float32)); print(type(env).__name__)"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    assert out.stdout.decode().strip() == "FastSawyerPickPlaceEnvV3"


def test_envs_of_one_class_share_one_compile_but_own_their_models() -> None:
    from metarl_lightning.envs.fast.base import _COMPILED_MODELS

    cls = env_class("push-v3", fast=True)
    first = make_env(cls, "push-v3", True)
    template = _COMPILED_MODELS[first.fullpath]
    first.model.body_pos[1] += 0.5  # an env moving its own bodies must not move the next env's
    second = make_env(cls, "push-v3", True)
    assert _COMPILED_MODELS[first.fullpath] is template, "compiled once per process"
    assert second.model is not template and first.model is not second.model
    assert not np.array_equal(first.model.body_pos, second.model.body_pos)
    assert np.array_equal(second.model.body_pos, template.body_pos)
    stock = make_env(ALL_V3_ENVIRONMENTS["push-v3"], "push-v3", True)
    assert_same(stock.reset(), second.reset(), "reset")
    action = np.array([0.3, -0.2, 0.1, 0.5], dtype=np.float32)
    for t in range(20):
        assert_same(stock.step(action), second.step(action), f"step {t}")
