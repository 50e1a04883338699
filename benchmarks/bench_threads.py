"""Meta-training throughput quiet and under a synthetic load, per choice of learner threads (issue 15).

A researcher's laptop or a shared node is rarely idle. This benchmark starts its own load (one
busy process per usable core, ``while True: pass``), runs full MT10 meta-training iterations of
each policy the configs train (the Meta-World configs' S5, the quickstart's MLP; support + adapt +
query + PPO update, pipelined collection with the env workers, as the configs) in a fresh process per
measurement, and stops the load again. Quiet and loaded runs are interleaved, and each learner
thread count is measured in both.

Printed per policy and learner thread count: median env steps/s quiet and loaded, the cores the load took
(its CPU seconds / wall seconds), and the **kept share**: loaded env steps/s divided by what the
cores left over explain, ``quiet * (cores - taken) / cores`` (1.0: the run lost only the cores the
load took; the target is >= 0.8). ``null`` is the default, ``data.learner_threads: null``: the
threads chosen at every meta-iteration from the cores other jobs leave free.

Usage: python benchmarks/bench_threads.py [--quick] [--repeats R] [--steps T] [--iterations I] [--policies ssm mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from metarl_lightning.threads import stat_fields, usable_cores

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat`` utime + stime)."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(policy: str, threads: int, loaded: bool, cores: int, args: argparse.Namespace) -> tuple[float, float]:
    """``(median env steps/s, cores taken by the load)`` of one fresh child run."""
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores if loaded else 0)]
    try:
        time.sleep(0.5 if loaded else 0.0)  # the load is running before the child starts
        start_cpu = sum(cpu_seconds(p.pid) for p in load)
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, str(Path(__file__)), "--child", "--policy", policy, "--threads", str(threads),
             "--steps", str(args.steps), "--iterations", str(args.iterations)],
            check=True, capture_output=True, text=True,
        ).stdout
        wall = time.perf_counter() - start
        taken = (sum(cpu_seconds(p.pid) for p in load) - start_cpu) / wall
    finally:
        for p in load:
            p.kill()
            p.wait()
    return json.loads(out.strip().splitlines()[-1])["rate"], taken


def child(policy_name: str, threads: int, steps: int, iterations: int) -> None:
    """One measurement: ``iterations`` MT10 iterations of ``policy_name`` with ``threads`` learner threads."""
    sys.path.insert(0, str(HERE))
    import torch

    from bench_collector import POLICY_CONFIGS
    from common import config_policy, measure_fit

    from metarl_lightning.data import MetaTaskDataModule
    from metarl_lightning.module import MetaRLModule

    data = MetaTaskDataModule("MT10", meta_batch_size=10, rollouts_per_task=10, envs_per_task=10, max_episode_steps=steps,
                              num_env_workers=2, pipeline_rollouts=True, learner_threads=threads or None)
    policy = config_policy(POLICY_CONFIGS[policy_name], 39, 4)
    meter = measure_fit(MetaRLModule(policy, ppo_epochs=4), data, iterations, accelerator="cpu")
    assert not threads or torch.get_num_threads() == threads, "the data module sets the learner threads"
    print(json.dumps({"rate": meter.median_rate}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat of short iterations (noisier)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats per setting")
    parser.add_argument("--steps", type=int, default=200, help="episode steps (configs/mt10.yaml: 500)")
    parser.add_argument("--iterations", type=int, default=4, help="iterations per run (the first is left out)")
    parser.add_argument("--policies", nargs="+", choices=("ssm", "mlp"), default=["ssm", "mlp"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="ssm", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.policy, args.threads, args.steps, args.iterations)
        return
    if args.quick:
        args.repeats, args.steps, args.iterations = 1, 100, 3
    cores = usable_cores()
    choices = sorted({1, cores}) + [0]  # 0: the library's choice at every iteration (learner_threads null)
    rates: dict[tuple[str, int, bool], list[float]] = {}
    taken: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for policy in args.policies:
            for threads in choices:
                for loaded in (False, True):
                    rate, cores_taken = measure(policy, threads, loaded, cores, args)
                    rates.setdefault((policy, threads, loaded), []).append(rate)
                    if loaded:
                        taken.setdefault((policy, threads), []).append(cores_taken)
    print(f"MT10, 10 agents x 10 envs x {args.steps} steps, {cores} usable cores, load = {cores} busy processes, "
          f"{args.repeats} interleaved repeat(s)")
    print("| policy | learner threads | quiet env steps/s | loaded env steps/s | cores the load took | kept share |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy in args.policies:
        for threads in choices:
            quiet, loaded = statistics.median(rates[policy, threads, False]), statistics.median(rates[policy, threads, True])
            took = statistics.median(taken[policy, threads])
            share = loaded / (quiet * max(cores - took, 1e-6) / cores)
            name = {"ssm": "S5", "mlp": "MLP"}[policy]
            print(f"| {name} | {threads or 'null (chosen per iteration)'} | {quiet:,.0f} | {loaded:,.0f} | {took:.2f} | {share:.2f} |")


if __name__ == "__main__":
    main()
