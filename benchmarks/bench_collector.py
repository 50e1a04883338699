"""Collector throughput on MT10: the multi-agent collector vs random stepping of the same envs.

Prints, each a ratio measured in one run:
  * env steps/s of the collector acting with a policy (MLP and S5; one vmapped call per step for all
    agents) vs the same worker layout stepped with random actions (target >= 0.85);
  * end-to-end env steps/s of full meta-training iterations (support + adapt + query + PPO update)
    vs random stepping, and the share of an iteration spent collecting.

Usage: python benchmarks/bench_collector.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import measure_fit

from metarl_lightning.algorithms.maml import stack_for_agents
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.envs.benchmarks import make_benchmark
from metarl_lightning.envs.workers import MetaWorldVectorEnv
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic, SSMActorCritic
from metarl_lightning.rollouts import RolloutCollector


def random_steps_per_s(env: MetaWorldVectorEnv, steps: int) -> float:
    rng = np.random.default_rng(0)
    env.reset()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, size=(env.num_envs, env.action_dim)).astype(np.float32))
    return steps * env.num_envs / (time.perf_counter() - start)


def collector_steps_per_s(env: MetaWorldVectorEnv, policy: torch.nn.Module, steps: int, per_agent: bool = True, compiled: bool = False) -> float:
    """Per-agent parameters (the query rollouts: vmap over agents) or shared theta (the support rollouts).

    A compiled collector is warmed up with one untimed rollout (compilation is a one-off cost).
    """
    collector = RolloutCollector(env, compile_policy=compiled)
    params = {k: v.detach() for k, v in stack_for_agents(dict(policy.named_parameters()), env.num_agents).items()}
    params = params if per_agent else None
    noise = torch.randn(env.num_agents, env.envs_per_agent, steps, env.action_dim)
    if compiled:
        collector.collect(policy, params, steps, noise)
    start = time.perf_counter()
    collector.collect(policy, params, steps, noise)
    return steps * env.num_envs / (time.perf_counter() - start)


def end_to_end(policy_name: str, steps: int, iterations: int) -> tuple[float, float]:
    data = MetaTaskDataModule("MT10", meta_batch_size=10, rollouts_per_task=2, envs_per_task=2, max_episode_steps=steps, num_env_workers=2)
    policy = MLPActorCritic(39, 4) if policy_name == "mlp" else SSMActorCritic(39, 4)
    meter = measure_fit(MetaRLModule(policy, ppo_epochs=4), data, iterations, accelerator="cpu")
    return meter.median_rate, meter.median_collect_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (noisier)")
    args = parser.parse_args()
    steps = 100 if args.quick else 400
    torch.set_num_threads(1)
    bench = make_benchmark("MT10")
    env = MetaWorldVectorEnv(bench, "train", num_agents=10, envs_per_agent=2, num_workers=2, max_episode_steps=steps + 1)
    env.set_tasks(bench.sample_tasks("train", 10, np.random.default_rng(0)))
    rows = []
    policies = {"mlp": MLPActorCritic(39, 4), "ssm": SSMActorCritic(39, 4)}
    for name in ("mlp", "ssm"):
        for per_agent in (True, False):
            for compiled in (False, True):
                # Interleave so load from other processes hits both sides alike.
                random_rate = random_steps_per_s(env, steps)
                policy_rate = collector_steps_per_s(env, policies[name], steps, per_agent, compiled)
                label = f"{name} {'per-agent' if per_agent else 'theta'}{' compiled' if compiled else ''}"
                rows.append((label, random_rate, policy_rate))
    env.close()
    print(f"{'policy / params':27} {'random steps/s':>15} {'collector steps/s':>18} {'ratio':>6}")
    for name, random_rate, policy_rate in rows:
        print(f"{name:27} {random_rate:15.0f} {policy_rate:18.0f} {policy_rate / random_rate:6.2f}")

    # Issue 7's end-to-end gain: the same collector (MLP, per-agent params) on stock vs fast envs.
    rates = {}
    for fast in (False, True, False, True):
        fast_env = MetaWorldVectorEnv(bench, "train", num_agents=10, envs_per_agent=2, num_workers=2, max_episode_steps=steps + 1, fast=fast)
        fast_env.set_tasks(bench.sample_tasks("train", 10, np.random.default_rng(0)))
        rates.setdefault(fast, []).append(collector_steps_per_s(fast_env, policies["mlp"], steps))
        fast_env.close()
    stock, fast_rate = np.mean(rates[False]), np.mean(rates[True])
    print(f"collector on MT10, stock envs {stock:.0f} steps/s, fast envs {fast_rate:.0f} steps/s: {fast_rate / stock:.2f}x")
    reference = float(np.mean([r for _, r, _ in rows]))
    for name in ("mlp", "ssm"):
        rate, share = end_to_end(name, steps, 3 if args.quick else 5)
        print(f"end-to-end meta-iteration ({name}): {rate:.0f} env steps/s = {rate / reference:.2f} x random stepping; collection {share:.0%} of the iteration")


if __name__ == "__main__":
    main()
