"""Collector throughput on MT10: the multi-agent collector vs random stepping of the same envs.

Prints, each a ratio measured in one run:
  * env steps/s of the collector acting with a policy (the quickstart's MLP and the Meta-World
    configs' S5, built from ``configs/``; per-agent parameters as in the
    query rollouts, shared theta as in the support rollouts; steps in sync or pipelined over the two
    worker lanes) vs the same worker layout stepped with random actions (target >= 0.85). Both
    sides reset the envs and then step them ``T`` times; candidates are interleaved and repeated,
    and the median ratio is reported with the learner's CPU time per step (the cost that does not
    overlap env stepping unless pipelined);
  * the collector on fast vs stock envs (issue 7's end-to-end gain);
  * end-to-end env steps/s of full meta-training iterations (support + adapt + query + PPO update,
    pipelined collection as in the configs) vs random stepping, and the share of an iteration spent
    collecting.

Usage: python benchmarks/bench_collector.py [--quick] [--benchmark MT10] [--agents 10] [--envs-per-agent E] [--table-only]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from common import config_policy, measure_fit

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.envs.benchmarks import make_benchmark
from metarl_lightning.envs.workers import MetaWorldVectorEnv
from metarl_lightning.module import MetaRLModule
from metarl_lightning.rollouts import RolloutCollector

# The policies measured are the ones the configs train: the quickstart's MLP, the Meta-World S5.
POLICY_CONFIGS = {"mlp": "quickstart.yaml", "ssm": "mt10.yaml"}


def timed(run: Callable[[], None], steps: int) -> tuple[float, float]:
    """``(env steps/s, learner CPU seconds)`` of one call of ``run`` taking ``steps`` env steps."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return steps / (time.perf_counter() - wall), time.process_time() - cpu


def random_rollout(env: MetaWorldVectorEnv, steps: int, rng: np.random.Generator) -> Callable[[], None]:
    def run() -> None:
        env.reset()
        for _ in range(steps):
            env.step(rng.uniform(-1, 1, size=(env.num_envs, env.action_dim)).astype(np.float32))

    return run


def policy_rollout(env: MetaWorldVectorEnv, policy: torch.nn.Module, steps: int, per_agent: bool, pipeline: bool) -> Callable[[], None]:
    collector = RolloutCollector(env, pipeline=pipeline, acting_threads=1)
    params = {k: v.detach() for k, v in stack_for_agents(dict(policy.named_parameters()), env.num_agents).items()}
    noise = torch.randn(env.num_agents, env.envs_per_agent, steps, env.action_dim)
    return lambda: collector.collect(policy, params if per_agent else None, steps, noise)


def collector_table(env: MetaWorldVectorEnv, steps: int, repeats: int) -> list[tuple[str, float, float, float]]:
    """Rows ``(label, random steps/s, collector/random ratio, learner CPU us per step)``, medians of ``repeats``."""
    rng = np.random.default_rng(0)
    obs_dim = env.observation_dim
    policies = {name: config_policy(config, obs_dim, 4) for name, config in POLICY_CONFIGS.items()}
    candidates: dict[str, Callable[[], None]] = {}
    for name, policy in policies.items():
        for per_agent in (True, False):
            for pipeline in (False, True):
                label = f"{name} {'per-agent' if per_agent else 'theta'} {'pipelined' if pipeline else 'sync'}"
                candidates[label] = policy_rollout(env, policy, steps, per_agent, pipeline)
    env_steps = steps * env.num_envs
    results: dict[str, list[tuple[float, float, float]]] = {label: [] for label in candidates}
    for _ in range(repeats):
        for label, run in candidates.items():
            # A random-action rollout right before each candidate: load drifts hit both alike.
            random_rate, _ = timed(random_rollout(env, steps, rng), env_steps)
            rate, cpu = timed(run, env_steps)
            results[label].append((random_rate, rate, cpu / steps * 1e6))
    rows = []
    for label, runs in results.items():
        ratio = statistics.median(r / b for b, r, _ in runs)
        rows.append((label, statistics.median(b for b, _, _ in runs), ratio, statistics.median(c for _, _, c in runs)))
    return rows


def end_to_end(benchmark: str, agents: int, policy_name: str, steps: int, envs_per_agent: int, iterations: int) -> tuple[float, float]:
    data = MetaTaskDataModule(
        benchmark, meta_batch_size=agents, rollouts_per_task=envs_per_agent, envs_per_task=envs_per_agent,
        max_episode_steps=steps, num_env_workers=2, pipeline_rollouts=True,  # as the configs
    )
    policy = config_policy(POLICY_CONFIGS[policy_name], 39, 4)
    meter = measure_fit(MetaRLModule(policy, ppo_epochs=4), data, iterations, accelerator="cpu")
    return meter.median_rate, meter.median_collect_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (noisier)")
    parser.add_argument("--benchmark", default="MT10", help="an MT benchmark (train classes = all classes)")
    parser.add_argument("--agents", type=int, default=10, help="agents K (a multiple of the class count)")
    parser.add_argument("--envs-per-agent", type=int, default=10, help="envs per agent E (configs/mt10.yaml: 10)")
    parser.add_argument("--table-only", action="store_true", help="only the collector vs random table")
    args = parser.parse_args()
    steps, repeats = (100, 1) if args.quick else (400, 3)
    K, E = args.agents, args.envs_per_agent
    bench = make_benchmark(args.benchmark)
    env = MetaWorldVectorEnv(bench, "train", num_agents=K, envs_per_agent=E, num_workers=2, max_episode_steps=steps + 1)
    env.set_tasks(bench.sample_tasks("train", K, np.random.default_rng(0)))
    rows = collector_table(env, steps, repeats)
    env.close()
    print(f"{args.benchmark}, {K} agents x {E} envs, 2 workers, {steps} steps, median of {repeats}")
    if args.quick:
        print("(--quick: a smoke run; one short repeat, env resets weigh heavily, the ratios are not measurements)")
    print(f"{'policy / params / stepping':30} {'random steps/s':>15} {'ratio':>6} {'learner CPU/step':>17}")
    for label, random_rate, ratio, cpu_us in rows:
        print(f"{label:30} {random_rate:15.0f} {ratio:6.2f} {cpu_us:14.0f} us")
    if args.table_only:
        return

    # Issue 7's end-to-end gain: the same collector (MLP, per-agent params) on stock vs fast envs.
    rates: dict[bool, list[float]] = {}
    for fast in (False, True, False, True):
        fast_env = MetaWorldVectorEnv(bench, "train", K, E, num_workers=2, max_episode_steps=steps + 1, fast=fast)
        fast_env.set_tasks(bench.sample_tasks("train", K, np.random.default_rng(0)))
        policy = config_policy(POLICY_CONFIGS["mlp"], fast_env.observation_dim, 4)
        rates.setdefault(fast, []).append(timed(policy_rollout(fast_env, policy, steps, True, False), steps * fast_env.num_envs)[0])
        fast_env.close()
    stock, fast_rate = np.mean(rates[False]), np.mean(rates[True])
    print(f"collector on {args.benchmark}, stock envs {stock:.0f} steps/s, fast envs {fast_rate:.0f} steps/s: {fast_rate / stock:.2f}x")
    reference = float(np.median([r for _, r, _, _ in rows]))
    for name in ("mlp", "ssm"):
        rate, share = end_to_end(args.benchmark, K, name, steps, E, 3 if args.quick else 5)
        print(f"end-to-end meta-iteration ({name}, pipelined): {rate:.0f} env steps/s = {rate / reference:.2f} x random stepping; collection {share:.0%} of the iteration")


if __name__ == "__main__":
    main()
