"""Environment-side throughput: benchmark construction (cold vs cached) and worker stepping rate.

Usage:
    python benchmarks/bench_envs.py            # all six benchmarks, long stepping runs
    python benchmarks/bench_envs.py --quick    # MT1, ML1, MT10, ML10 and short runs (~1 min)

Stepping compares the worker layout (``--num-workers`` processes, the envs split between them)
with one process stepping the same envs, random actions, auto-resets included. The machine is
shared, so the two are measured interleaved, several times, and the median ratio is reported,
with the load average. The "ceiling" is the same split stepped by independent processes that
never talk to each other: what the cores allow, whatever the messaging costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import multiprocessing as mp
import time
from typing import Any

import numpy as np

from metarl_lightning.envs.benchmarks import BENCHMARKS, make_benchmark
# The group is what a worker runs; the ceiling measurement steps it without a parent.
from metarl_lightning.envs.worker_process import FIELDS, EnvGroup
from metarl_lightning.envs.workers import MetaWorldVectorEnv

QUICK_BENCHMARKS = ("MT1", "ML1", "MT10", "ML10")
SINGLE_ENV = "reach-v3"  # the env of MT1/ML1


def bench_construction(names: tuple[str, ...], seed: int) -> list[dict]:
    """Time building each benchmark from scratch, then loading it from a fresh cache folder."""
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in names:
            env_name = SINGLE_ENV if name in ("MT1", "ML1") else None
            start = time.perf_counter()
            make_benchmark(name, env_name, seed=seed, cache_dir=cache_dir)  # builds and writes
            cold = time.perf_counter() - start
            start = time.perf_counter()
            make_benchmark(name, env_name, seed=seed, cache_dir=cache_dir)  # loads the pickle
            cached = time.perf_counter() - start
            files = [f for f in os.listdir(cache_dir) if f.startswith(f"{name}-")]
            kb = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in files) // 1024
            rows.append({"benchmark": name, "cold_s": round(cold, 2), "cached_ms": round(cached * 1e3, 2)})
            rows[-1]["cache_kB"] = kb
            print(f"{name:5s} build {cold:7.2f} s   cached load {cached * 1e3:7.2f} ms   ({kb} kB)", flush=True)
    return rows


def _steps_per_second(env: MetaWorldVectorEnv, actions: np.ndarray) -> float:
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return actions.shape[0] * env.num_envs / (time.perf_counter() - start)


def _independent_group(
    classes: list[str], tasks: list, actions: np.ndarray, fast: bool, barrier: Any, out: Any
) -> None:
    """Step one group of envs alone (no parent, no messages) and report the wall time."""
    n = len(classes)
    buffers = {k: np.zeros((n, *shape), dtype=dt) for k, (shape, dt) in FIELDS.items()}
    group = EnvGroup(classes, list(range(n)), 500, fast, False, buffers)
    group.reset(tasks)
    barrier.wait()  # all groups start together, so the slowest one bounds the aggregate rate
    start = time.perf_counter()
    for a in actions:
        buffers["action"][:] = a
        group.step()
    out.put(time.perf_counter() - start)
    group.close()


def _ceiling_steps_per_second(
    classes: list[str], tasks: list, actions: np.ndarray, num_workers: int, fast: bool
) -> float:
    """Aggregate steps/s of ``num_workers`` processes stepping their share with no coordination.

    The upper bound of any worker layout on this machine: it measures how well the cores scale
    (SMT siblings, shared caches, other load) apart from the cost of messages and lockstep.
    """
    ctx = mp.get_context("forkserver")
    barrier, out = ctx.Barrier(num_workers), ctx.Queue()
    bounds = np.linspace(0, len(classes), num_workers + 1).round().astype(int)
    procs = [
        ctx.Process(
            target=_independent_group,
            args=(classes[lo:hi], tasks[lo:hi], actions[:, lo:hi], fast, barrier, out),
        )
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    for proc in procs:
        proc.start()
    elapsed = max(out.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    return actions.shape[0] * len(classes) / elapsed


def bench_stepping(
    benchmark: str,
    num_agents: int,
    envs_per_agent: int,
    num_workers: int,
    steps: int,
    repeats: int,
    fast: bool,
) -> dict:
    """Steps/s of ``num_workers`` worker processes vs in-process stepping of the same envs."""
    env_name = SINGLE_ENV if benchmark in ("MT1", "ML1") else None
    bench = make_benchmark(benchmark, env_name)  # default cache: construction was timed above
    tasks = bench.sample_tasks("train", num_agents, np.random.default_rng(0))
    n = num_agents * envs_per_agent
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, n, 4)).astype(np.float32)

    start = time.perf_counter()
    layout = (bench, "train", num_agents, envs_per_agent)
    local = MetaWorldVectorEnv(*layout, num_workers=0, fast=fast)
    local_build = time.perf_counter() - start
    start = time.perf_counter()
    workers = MetaWorldVectorEnv(*layout, num_workers=num_workers, fast=fast)
    workers_build = time.perf_counter() - start
    rates: dict[str, list[float]] = {"in_process": [], "workers": [], "ceiling": []}
    env_classes = [c for c in local.agent_classes for _ in range(envs_per_agent)]
    env_tasks = [t for t in tasks for _ in range(envs_per_agent)]
    try:
        for env in (local, workers):
            env.set_tasks(tasks)
            env.reset()
            _steps_per_second(env, actions[: max(steps // 10, 5)])  # warm-up
        load_before = os.getloadavg()[0]
        for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits both
            rates["in_process"].append(_steps_per_second(local, actions))
            rates["workers"].append(_steps_per_second(workers, actions))
            rates["ceiling"].append(
                _ceiling_steps_per_second(env_classes, env_tasks, actions, num_workers, fast)
            )
        load = max(load_before, os.getloadavg()[0])
    finally:
        local.close()
        workers.close()
    ratios = [w / s for w, s in zip(rates["workers"], rates["in_process"])]
    ceilings = [c / s for c, s in zip(rates["ceiling"], rates["in_process"])]
    row = {
        "benchmark": benchmark,
        "layout": f"{num_workers} workers x {n // max(num_workers, 1)} envs",
        "build_s": {"in_process": round(local_build, 2), "workers": round(workers_build, 2)},
        "steps_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "ratio_median": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
        "ceiling_ratio_median": round(statistics.median(ceilings), 2),
        "load_average_1min": round(load, 2),
        "fast": fast,
    }
    rate = row["steps_per_s"]
    print(
        f"{benchmark} {row['layout']} (fast={fast}): in-process {rate['in_process']} steps/s, "
        f"workers {rate['workers']} steps/s, ratio {row['ratio_median']} (runs {row['ratios']}); "
        f"independent processes {rate['ceiling']} steps/s, ceiling ratio {row['ceiling_ratio_median']}; "
        f"build {local_build:.2f} s in-process, {workers_build:.2f} s workers",
        flush=True,
    )
    if load > 1.5:  # other processes share the cores: the ratio understates the worker layout
        print(f"warning: load average {load:.1f} during the runs; the ratio is not reliable")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small benchmarks and short runs")
    parser.add_argument("--benchmark", default="MT10", choices=BENCHMARKS, help="benchmark to step")
    parser.add_argument("--num-agents", type=int, default=10)
    parser.add_argument("--envs-per-agent", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per mode")
    parser.add_argument("--no-fast", action="store_true", help="stock Meta-World classes")
    parser.add_argument("--skip-construction", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    steps = args.steps or (200 if args.quick else 1000)
    repeats = args.repeats or (3 if args.quick else 5)

    results: dict = {"cpus": len(os.sched_getaffinity(0))}
    if not args.skip_construction:
        names = QUICK_BENCHMARKS if args.quick else BENCHMARKS
        results["construction"] = bench_construction(names, seed=0)
    results["stepping"] = bench_stepping(
        args.benchmark,
        args.num_agents,
        args.envs_per_agent,
        args.num_workers,
        steps,
        repeats,
        fast=not args.no_fast,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
