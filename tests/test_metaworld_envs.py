"""Meta-World benchmarks and the worker vector env: splits, sampling, seeding, auto-reset, oracles.

Benchmarks are built through the default disk cache, so only the first run pays the build cost
(MT10/ML10: seconds; MT50/ML45: about a minute each, hence ``slow``).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import SawyerPushV3Policy, SawyerReachV3Policy

from metarl_lightning.envs.benchmarks import BENCHMARKS, Benchmark, make_benchmark
from metarl_lightning.envs.workers import MetaWorldVectorEnv

ML10_TEST = {"drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"}
ML45_TEST = {"bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"}


@pytest.fixture(scope="module")
def ml10() -> Benchmark:
    return make_benchmark("ML10", seed=0)


@pytest.fixture(scope="module")
def mt10() -> Benchmark:
    return make_benchmark("MT10", seed=0)


def _rand_vecs(tasks: list) -> np.ndarray:
    return np.stack([pickle.loads(t.data)["rand_vec"] for t in tasks])


def _assert_split(bench: Benchmark, expected_test: set[str], n_train: int) -> None:
    assert set(bench.test_classes) == expected_test
    assert len(bench.train_classes) == n_train and not set(bench.train_classes) & expected_test
    assert bench.train_classes == sorted(bench.train_classes)
    for split in ("train", "test"):
        for name, tasks in bench.tasks(split).items():
            assert name in bench.classes(split) and len(tasks) == 50
            assert {t.env_name for t in tasks} == {name}
    # Many meta-batches of training tasks: not one comes from a held-out class.
    rng = np.random.default_rng(0)
    seen = {t.env_name for _ in range(20) for t in bench.sample_tasks("train", 2 * n_train, rng)}
    assert seen == set(bench.train_classes)


def test_ml10_training_never_sees_test_classes(ml10: Benchmark) -> None:
    assert ml10.is_meta_learning and ml10.reward_function_version == "v2"
    _assert_split(ml10, ML10_TEST, 10)


@pytest.mark.slow
def test_ml45_training_never_sees_test_classes() -> None:
    _assert_split(make_benchmark("ML45", seed=0), ML45_TEST, 45)


@pytest.mark.slow
def test_mt50_has_all_classes() -> None:
    bench = make_benchmark("MT50", seed=0)
    assert bench.train_classes == sorted(ALL_V3_ENVIRONMENTS)
    assert bench.test_classes == bench.train_classes


def test_ml1_train_and_test_goals_are_disjoint() -> None:
    bench = make_benchmark("ML1", "push-v3", seed=0)
    train, test = _rand_vecs(bench.train_tasks["push-v3"]), _rand_vecs(bench.test_tasks["push-v3"])
    assert len(train) == len(test) == 50
    distances = np.linalg.norm(train[:, None] - test[None], axis=-1)
    assert distances.min() > 1e-6


def test_mt_test_split_is_the_training_split(mt10: Benchmark) -> None:
    assert not mt10.is_meta_learning
    assert mt10.test_classes == mt10.train_classes == mt10.all_classes
    assert mt10.test_tasks == mt10.train_tasks


def test_meta_batches_cover_classes_evenly_with_fixed_slots(ml10: Benchmark) -> None:
    slots = ml10.slot_classes("train", 20)
    assert slots[:10] == ml10.train_classes and slots[10:] == ml10.train_classes
    rng = np.random.default_rng(0)
    for _ in range(5):
        tasks = ml10.sample_tasks("train", 20, rng)
        assert [t.env_name for t in tasks] == slots  # slot -> class never changes
        for k in range(10):  # the two agents of a class get different goals
            assert tasks[k].data != tasks[k + 10].data
    assert ml10.slot_classes("test", 5) == ml10.test_classes
    with pytest.raises(ValueError, match=r"^meta_batch_size: 15 .*10 train classes"):
        ml10.slot_classes("train", 15)


def test_mt_meta_batches_of_any_size_cover_the_classes_evenly(mt10: Benchmark) -> None:
    """MT10 with 4 agents: iterations take classes 0-3, 4-7, 8-9 + 0-1, ...; over lcm(4, 10) / 4 =
    5 iterations every class has exactly 2 slots, and each iteration's tasks are of its slots'
    classes. Multiples keep the fixed layout whatever the iteration."""
    classes = mt10.train_classes
    counts = {c: 0 for c in classes}
    rng = np.random.default_rng(0)
    for iteration in range(5):
        slots = mt10.slot_classes("train", 4, iteration)
        assert slots == [classes[(4 * iteration + k) % 10] for k in range(4)]
        assert [t.env_name for t in mt10.sample_tasks("train", 4, rng, iteration)] == slots
        for c in slots:
            counts[c] += 1
    assert set(counts.values()) == {2}
    assert mt10.slot_classes("train", 3, 3) == [classes[9], classes[0], classes[1]]
    assert mt10.rotates("train", 4) and not mt10.rotates("train", 20)
    assert mt10.slot_classes("train", 20, 7) == mt10.slot_classes("train", 20) == classes * 2
    # A multiple draws exactly the tasks it drew before iterations existed (same rng stream).
    assert mt10.sample_tasks("train", 20, np.random.default_rng(5), 3) == mt10.sample_tasks("train", 20, np.random.default_rng(5))
    # Two agents of one class in one meta-batch (15 over 10 classes) get different goals.
    tasks = mt10.sample_tasks("train", 15, np.random.default_rng(0), 0)
    assert tasks[0].env_name == tasks[10].env_name and tasks[0].data != tasks[10].data


def test_rotating_slots_rebuild_their_simulators_for_a_new_class(mt10: Benchmark) -> None:
    """A rotating env given tasks of new classes steps exactly like an env built for those
    classes (same seeds, same actions), one-hot included, in workers as in-process."""
    second = mt10.sample_tasks("train", 4, np.random.default_rng(1), 1)  # classes 4-7
    first = mt10.sample_tasks("train", 4, np.random.default_rng(0), 0)  # classes 0-3
    with MetaWorldVectorEnv(mt10, "train", 4, 2, agent_classes=mt10.slot_classes("train", 4, 1), task_one_hot=True, max_episode_steps=15) as fresh:
        expected = _rollout(fresh, second, 20)
    for workers in (0, 2):
        with MetaWorldVectorEnv(mt10, "train", 4, 2, num_workers=workers, agent_classes=mt10.slot_classes("train", 4, 0),
                                rotating=True, task_one_hot=True, max_episode_steps=15) as env:
            _rollout(env, first, 5)
            got = _rollout(env, second, 20)
            assert env.agent_classes == [t.env_name for t in second]
            with pytest.raises(ValueError, match=r"^tasks\[0\]: 'door-close-v3' is not a class"):
                env.set_tasks([make_benchmark("ML10").sample_tasks("test", 5, np.random.default_rng(0))[0]] + second[1:])
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{key}, {workers} workers")
    hot = expected["reset"][0][:, 39:].argmax(axis=1)
    assert [mt10.all_classes[i] for i in hot] == [t.env_name for t in second for _ in range(2)]


def test_sampling_is_reproducible(ml10: Benchmark) -> None:
    a = ml10.sample_tasks("test", 10, np.random.default_rng(3))
    b = ml10.sample_tasks("test", 10, np.random.default_rng(3))
    c = ml10.sample_tasks("test", 10, np.random.default_rng(4))
    assert a == b and a != c


def _first_obs(bench: Benchmark, sample_seed: int, env_seed: int = 0) -> np.ndarray:
    with MetaWorldVectorEnv(bench, "train", 2, 2, seed=env_seed) as env:
        env.set_tasks(bench.sample_tasks("train", 2, np.random.default_rng(sample_seed)))
        return env.reset()


def test_same_seed_same_tasks_and_first_observations() -> None:
    # Build twice without the cache: metaworld's goal generation itself must be seeded.
    b0 = make_benchmark("MT1", "reach-v3", seed=0, use_cache=False)
    b0_again = make_benchmark("MT1", "reach-v3", seed=0, use_cache=False)
    b1 = make_benchmark("MT1", "reach-v3", seed=1, use_cache=False)
    assert b0.train_tasks == b0_again.train_tasks and b0.train_tasks != b1.train_tasks
    obs = _first_obs(b0, 0)
    assert obs.shape == (4, 39) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs, _first_obs(b0_again, 0))
    assert not np.array_equal(obs, _first_obs(b1, 0))  # other benchmark seed: other goals
    assert not np.array_equal(obs, _first_obs(b0, 1))  # other sampling seed: other goals


def test_cache_round_trip(tmp_path) -> None:
    built = make_benchmark("ML1", "reach-v3", seed=5, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("ML1-reach-v3-seed5-*.pkl"))) == 1
    start = time.perf_counter()
    loaded = make_benchmark("ML1", "reach-v3", seed=5, cache_dir=tmp_path)
    assert time.perf_counter() - start < 0.5
    assert loaded == built


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (("ML11",), r"^benchmark: unknown 'ML11'; valid: MT1, MT10, MT50, ML1, ML10, ML45$"),
        (("MT1",), r"^env_name: missing for MT1; valid: .*reach-v3"),
        (("ML1", "reach-v9"), r"^env_name: unknown 'reach-v9' for ML1; valid: "),
        (("MT10", "reach-v3"), r"^env_name: MT10 takes none"),
    ],
)
def test_bad_names_give_one_line_errors(args: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        make_benchmark(*args)
    assert "\n" not in str(info.value)
    assert BENCHMARKS == ("MT1", "MT10", "MT50", "ML1", "ML10", "ML45")


def test_bad_split_and_tasks(ml10: Benchmark) -> None:
    with pytest.raises(ValueError, match=r"^split: unknown 'val'; valid: train, test$"):
        ml10.classes("val")  # type: ignore[arg-type]
    with MetaWorldVectorEnv(ml10, "test", 5, 1) as env:
        with pytest.raises(RuntimeError, match="set_tasks"):
            env.reset()
        wrong = ml10.sample_tasks("test", 5, np.random.default_rng(0))[::-1]
        with pytest.raises(ValueError, match=r"^tasks\[0\]: agent 0 runs"):
            env.set_tasks(wrong)


def _rollout(env: MetaWorldVectorEnv, tasks: list, steps: int) -> dict[str, np.ndarray]:
    env.set_tasks(tasks)
    out: dict[str, list] = {"reset": [env.reset()]}
    rng = np.random.default_rng(7)
    for _ in range(steps):
        result = env.step(rng.uniform(-1, 1, (env.num_envs, env.action_dim)).astype(np.float32))
        for key, value in result._asdict().items():
            out.setdefault(key, []).append(value)
    return {key: np.stack(value) for key, value in out.items()}


def test_workers_match_in_process_stepping(mt10: Benchmark) -> None:
    tasks = mt10.sample_tasks("train", 10, np.random.default_rng(0))
    runs = []
    for num_workers in (0, 2):
        layout = (mt10, "train", 10, 1)
        with MetaWorldVectorEnv(*layout, num_workers=num_workers, max_episode_steps=15) as env:
            runs.append(_rollout(env, tasks, 40))  # crosses two auto-resets
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
    assert runs[0]["truncated"].sum() == 2 * 10


def test_lanes_step_independently_and_match_stepping_all() -> None:
    bench = make_benchmark("MT1", "reach-v3", seed=0)
    tasks = bench.sample_tasks("train", 5, np.random.default_rng(0))
    layout = (bench, "train", 5, 2)
    with MetaWorldVectorEnv(*layout, max_episode_steps=15, task_one_hot=True) as env:
        reference = _rollout(env, tasks, 40)
    # 3 workers over 2 lanes of 3 and 2 agents: lanes are agent ranges with their own workers.
    with MetaWorldVectorEnv(*layout, num_workers=3, max_episode_steps=15, task_one_hot=True) as env:
        assert env.lanes == [(0, 3), (3, 5)]
        env.set_tasks(tasks)
        env.reset()
        rng = np.random.default_rng(7)
        for t in range(40):
            actions = rng.uniform(-1, 1, (env.num_envs, env.action_dim)).astype(np.float32)
            # Lane 1 starts first and is collected last: lanes overlap and do not interfere.
            env.step_async(actions[6:], 1)
            env.step_async(actions[:6], 0)
            first, second = env.step_wait(0), env.step_wait(1)
            for key, value in first._asdict().items():
                joined = np.concatenate([value, getattr(second, key)])
                np.testing.assert_array_equal(joined, reference[key][t], err_msg=f"{key} at step {t}")
        with pytest.raises(ValueError, match=r"^actions: expected shape \(4, 4\)"):
            env.step_async(actions[:6], 1)


def test_auto_reset_at_step_limit() -> None:
    bench = make_benchmark("MT1", "reach-v3", seed=0)
    tasks = bench.sample_tasks("train", 1, np.random.default_rng(0))
    actions = np.random.default_rng(1).uniform(-1, 1, (12, 2, 4)).astype(np.float32)
    with MetaWorldVectorEnv(bench, "train", 1, 2, max_episode_steps=5) as env:
        env.set_tasks(tasks)
        first = env.reset()
        results = [env.step(a) for a in actions]
    # Reference: a bare metaworld env with the same task and actions.
    ref = ALL_V3_ENVIRONMENTS["reach-v3"]()
    ref.set_task(tasks[0])
    ref.reset()
    for t, result in enumerate(results):
        done = (t + 1) % 5 == 0
        assert result.truncated.tolist() == [done, done] and not result.terminated.any()
        ref_obs = ref.step(actions[t, 0])[0].astype(np.float32)
        np.testing.assert_allclose(result.final_observation[0], ref_obs, atol=1e-6)
        if done:  # the new episode starts where a fresh reset does; final_obs is the old one
            np.testing.assert_array_equal(result.observation, first)
            assert not np.array_equal(result.final_observation, first)
            ref.reset()
        else:
            np.testing.assert_array_equal(result.observation, result.final_observation)


def test_default_episode_is_500_steps() -> None:
    bench = make_benchmark("MT1", "reach-v3", seed=0)
    with MetaWorldVectorEnv(bench, "train", 1, 1) as env:
        env.set_tasks(bench.sample_tasks("train", 1, np.random.default_rng(0)))
        env.reset()
        truncated = [env.step(np.zeros((1, 4), np.float32)).truncated[0] for _ in range(501)]
    assert [t for t, flag in enumerate(truncated) if flag] == [499]


def test_explicit_agent_classes_for_a_rank_shard(mt10: Benchmark) -> None:
    # DDP: rank 1 of 2 runs agents 5..9 of a 10-agent MT10 meta-batch.
    shard = mt10.slot_classes("train", 10)[5:]
    tasks = mt10.sample_tasks("train", 10, np.random.default_rng(0))[5:]
    with MetaWorldVectorEnv(mt10, "train", 5, 1, agent_classes=shard, task_one_hot=True) as env:
        env.set_tasks(tasks)
        obs = env.reset()
    assert env.agent_classes == shard
    assert obs[:, 39:].argmax(axis=1).tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"^agent_classes\[0\]: 'drawer-open-v3' is not a train"):
        MetaWorldVectorEnv(make_benchmark("ML10"), "train", 1, 1, agent_classes=["drawer-open-v3"])
    with pytest.raises(ValueError, match=r"^agent_classes: expected 5"):
        MetaWorldVectorEnv(mt10, "train", 5, 1, agent_classes=shard[:2])


def test_task_one_hot_spans_train_and_test_classes(ml10: Benchmark) -> None:
    with MetaWorldVectorEnv(ml10, "test", 5, 2, task_one_hot=True) as env:
        env.set_tasks(ml10.sample_tasks("test", 5, np.random.default_rng(0)))
        obs = env.reset()
    assert env.observation_dim == 39 + 15 and obs.shape == (10, 54)
    hot = obs[:, 39:].argmax(axis=1)
    assert obs[:, 39:].sum(axis=1).tolist() == [1.0] * 10
    assert [ml10.all_classes[i] for i in hot] == [c for c in ml10.test_classes for _ in range(2)]


def test_worker_errors_surface_and_close_stops_workers(mt10: Benchmark) -> None:
    env = MetaWorldVectorEnv(mt10, "train", 10, 1, num_workers=2)
    procs = list(env._procs)
    assert all(p.is_alive() for p in procs)
    env.set_tasks(mt10.sample_tasks("train", 10, np.random.default_rng(0)))
    env._tasks = env._tasks[::-1]  # bypass set_tasks' check: metaworld's set_task asserts the class
    with pytest.raises(RuntimeError, match=r"(?s)worker 0 failed:.*AssertionError"):
        env.reset()
    env.close()  # already closed by the error: idempotent
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        env.reset()


@pytest.mark.parametrize(
    ("env_name", "policy", "num_workers"),
    [("reach-v3", SawyerReachV3Policy(), 0), ("push-v3", SawyerPushV3Policy(), 2)],
)
def test_scripted_expert_succeeds_and_random_does_not(
    env_name: str, policy: object, num_workers: int
) -> None:
    # MT tasks show the goal in the observation, which the scripted policies read.
    bench = make_benchmark("MT1", env_name, seed=0)
    tasks = bench.sample_tasks("train", 4, np.random.default_rng(0))
    layout = (bench, "train", 4, 1)
    with MetaWorldVectorEnv(*layout, num_workers=num_workers, max_episode_steps=150) as env:
        env.set_tasks(tasks)
        obs, expert = env.reset(), np.zeros(4, bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Constant(s) may be too high"
            for _ in range(150):
                actions = np.clip(np.stack([policy.get_action(o) for o in obs]), -1, 1)
                result = env.step(actions)
                obs, expert = result.observation, expert | result.success
        env.reset()
        rng, random = np.random.default_rng(0), np.zeros(4, bool)
        for _ in range(150):
            random |= env.step(rng.uniform(-1, 1, (4, 4))).success
    assert expert.mean() >= 0.9
    assert random.mean() < 0.5


MAIN_SCRIPT = '''
import sys
with open(sys.argv[1], "a") as handle:
    handle.write(__name__ + "\\n")  # a re-run of this script in a worker writes "__mp_main__"
from metarl_lightning.envs.benchmarks import make_benchmark
from metarl_lightning.envs.workers import MetaWorldVectorEnv

if __name__ == "__main__":
    env = MetaWorldVectorEnv(make_benchmark("MT1", "reach-v3", seed=0), "train", num_agents=1, envs_per_agent=2,
                             num_workers=2, max_episode_steps=5)
    env.close()
    print(__file__)  # restored after the workers started
'''


def test_workers_do_not_rerun_the_main_script(tmp_path: Path) -> None:
    script, log = tmp_path / "main_script.py", tmp_path / "imports.txt"
    script.write_text(MAIN_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(script)
    assert log.read_text().split() == ["__main__"]


def test_envs_built_in_the_background_match_and_report_build_errors_at_first_use(mt10: Benchmark) -> None:
    tasks = mt10.sample_tasks("train", 10, np.random.default_rng(0))
    runs = []
    for wait in (True, False):
        with MetaWorldVectorEnv(mt10, "train", 10, 1, num_workers=2, max_episode_steps=15, wait=wait) as env:
            assert env._building is not wait
            runs.append(_rollout(env, tasks, 20))
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
    # gymnasium refuses a negative seed while the worker builds: raised where the build is awaited.
    env = MetaWorldVectorEnv(mt10, "train", 10, 1, num_workers=2, seed=-100, wait=False)
    env.set_tasks(tasks)
    with pytest.raises(RuntimeError, match=r"(?s)worker 0 failed:.*seed"):
        env.reset()
    # Closed before its first use: the workers finish building and stop.
    env = MetaWorldVectorEnv(mt10, "train", 10, 1, num_workers=2, wait=False)
    procs = list(env._procs)
    env.close()
    assert not any(p.is_alive() for p in procs)


PRESTART_SCRIPT = '''
import sys, time
from metarl_lightning.envs.process_start import prestart_fork_server

if __name__ == "__main__":
    assert prestart_fork_server() and not prestart_fork_server(), "started once, then found running"
    assert "mujoco" not in sys.modules, "the main process imported the workers' modules itself"
    from multiprocessing import forkserver
    maps = f"/proc/{forkserver._forkserver._forkserver_pid}/maps"
    deadline = time.time() + 120
    while "mujoco" not in open(maps).read():  # the server imports the workers' modules by itself
        assert time.time() < deadline, "the fork server never imported MuJoCo"
        time.sleep(0.1)
    from metarl_lightning.envs.benchmarks import make_benchmark
    from metarl_lightning.envs.workers import MetaWorldVectorEnv
    bench = make_benchmark("MT1", "reach-v3", seed=0)
    with MetaWorldVectorEnv(bench, "train", num_agents=1, envs_per_agent=2, num_workers=2, max_episode_steps=5) as env:
        env.set_tasks(bench.sample_tasks("train", 1, __import__("numpy").random.default_rng(0)))
        print(env.reset().shape)
'''


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the fork server's memory maps (Linux)")
def test_prestarted_fork_server_imports_the_worker_modules_and_serves_the_workers(tmp_path: Path) -> None:
    script = tmp_path / "prestart.py"
    script.write_text(PRESTART_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(2, 39)"
