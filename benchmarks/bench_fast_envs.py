"""Steps/s of the stock vs the fast Meta-World v3 classes, one process, random actions.

    python benchmarks/bench_fast_envs.py [--quick] [--rounds N] [--steps N]

Timings on a shared machine drift, so each row is a ratio measured within one run: stock and fast
envs (same seed, same actions) step alternately in short blocks, and each side's time is summed over
all its blocks. Only ``step`` is timed; the reset at the episode limit (500 steps, identical code in
both) happens outside the clock. ``MT10 mix`` steps the ten MT10 classes round-robin, as a collector
worker holding one env per task does.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
from metaworld.sawyer_xyz_env import SawyerXYZEnv

from metarl_lightning.envs.fast import env_class

SINGLE_ENVS = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3")


def make_env(env_name: str, fast: bool, seed: int) -> SawyerXYZEnv:
    """An env drawing a new seeded goal at every reset (MT1-style), ready to step."""
    env = env_class(env_name, fast=fast)() if fast else ALL_V3_ENVIRONMENTS[env_name]()
    # What a Meta-World task sets, without building a benchmark (which resets each env 50 times).
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.seed(seed)
    env.reset()
    return env


def time_block(envs: Sequence[SawyerXYZEnv], actions: np.ndarray) -> float:
    """Seconds spent in ``step`` for ``actions[t]`` on ``envs[t % len(envs)]``; resets untimed."""
    total = 0.0
    n = len(envs)
    for t, action in enumerate(actions):
        env = envs[t % n]
        start = time.perf_counter()
        truncated = env.step(action)[3]
        total += time.perf_counter() - start
        if truncated:
            env.reset()
    return total


def measure(env_names: Sequence[str], rounds: int, steps: int, seed: int = 0) -> tuple[float, float]:
    """Stock and fast steps/s for round-robin stepping over ``env_names``, interleaved in blocks."""
    stock = [make_env(name, fast=False, seed=seed + i) for i, name in enumerate(env_names)]
    fast = [make_env(name, fast=True, seed=seed + i) for i, name in enumerate(env_names)]
    rng = np.random.default_rng(seed)
    time_block(stock, rng.uniform(-1, 1, (50, 4)).astype(np.float32))  # warm-up both sides
    time_block(fast, rng.uniform(-1, 1, (50, 4)).astype(np.float32))
    stock_s = fast_s = 0.0
    for r in range(rounds):
        actions = rng.uniform(-1, 1, (steps, 4)).astype(np.float32)
        # Alternate which side goes first so neither always gets the warmer cache.
        if r % 2 == 0:
            stock_s += time_block(stock, actions)
            fast_s += time_block(fast, actions)
        else:
            fast_s += time_block(fast, actions)
            stock_s += time_block(stock, actions)
    n = rounds * steps
    return n / stock_s, n / fast_s


def main(argv: Sequence[str] | None = None) -> None:
    """Print one row per env class and the MT10 mix: stock steps/s, fast steps/s, ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~20 s)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved blocks per side")
    parser.add_argument("--steps", type=int, default=None, help="steps per block")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 10)
    steps = args.steps or (250 if args.quick else 500)

    if env_class("reach-v3", fast=True) is ALL_V3_ENVIRONMENTS["reach-v3"]:
        print("note: fast envs unavailable for these metaworld/mujoco versions; comparing stock to stock")
    rows = [(name, [name]) for name in SINGLE_ENVS] + [("MT10 mix", list(MT10_V3))]
    print(f"{'env':<16}{'stock steps/s':>15}{'fast steps/s':>15}{'ratio':>8}")
    for label, names in rows:
        stock_rate, fast_rate = measure(names, rounds, steps)
        print(f"{label:<16}{stock_rate:>15.0f}{fast_rate:>15.0f}{fast_rate / stock_rate:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
