"""SSM policy speed: parallel scan vs loops, rollout step cost vs the MLP, training vs torch.nn.GRU.

Usage:
    python benchmarks/bench_ssm.py            # batch 200, length 500, width 128 (~2 min)
    python benchmarks/bench_ssm.py --quick    # smaller sizes, fewer repeats (~20 s)

Three measurements:

1. Forward+backward of one S5 layer (width H, state P = H) over ``[B, T, H]``: the parallel scan vs
   the same layer with the recurrence in a Python loop (projections batched, an honest loop) and vs
   a loop of ``step`` (the naive recurrent implementation: projections inside the loop).
2. Rollout cost per agent-step of the collector's acting step with ``K`` agents' parameters
   (``ActorCritic.acting_step``: native for MLP and SSM, the vmapped ``forward`` for the GRU), SSM
   and GRU actor-critics vs ``MLPActorCritic``; the vmapped path of MLP and SSM for reference.
3. Training forward+backward of the S5 layer vs ``torch.nn.GRU`` of the same width.

The machine is shared, so candidates are timed interleaved, several times, and the median of each
is reported together with ratios taken within the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

from metarl_lightning.policies import GRUActorCritic, MLPActorCritic, SSMActorCritic
from metarl_lightning.policies.acting import GenericActingStep
from metarl_lightning.policies.ssm import S5


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each candidate, calling them round-robin (one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def step_loop(layer: S5, u: torch.Tensor) -> torch.Tensor:
    """The layer as a naive recurrent loop of ``step`` (projections per step)."""
    h = layer.initial_state(u.shape[0])
    ys = []
    for u_t in u.unbind(1):
        y_t, h = layer.step(u_t, h)
        ys.append(y_t)
    return torch.stack(ys, 1)


def bench_scan(batch: int, length: int, width: int, repeats: int) -> dict[str, float]:
    """Forward+backward seconds of the S5 layer with each recurrence implementation."""
    torch.manual_seed(0)
    parallel, sequential = S5(width, width), S5(width, width, scan="sequential")
    sequential.load_state_dict(parallel.state_dict())
    u = torch.randn(batch, length, width, requires_grad=True)
    resets = torch.rand(batch, length) < 1 / 200  # a few episode boundaries, as in training

    def fwd_bwd(run: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: run().square().mean().backward()

    return interleaved(
        {
            "parallel scan": fwd_bwd(lambda: parallel(u, None, resets)[0]),
            "sequential loop": fwd_bwd(lambda: sequential(u, None, resets)[0]),
            "step loop": fwd_bwd(lambda: step_loop(parallel, u)),
        },
        repeats,
    )


def bench_rollout_step(
    agents: int, envs: int, obs_dim: int, act_dim: int, steps: int, repeats: int, with_values: bool = False
) -> dict[str, float]:
    """Microseconds per agent-step of the collector's acting step (per-agent parameters, inference mode).

    ``<policy>`` is the policy's own ``acting_step`` (native for MLP and SSM: parameters folded once
    per rollout, agents batched by matmul); ``<policy> vmap`` is the generic path (``forward`` with
    ``T == 1`` under vmap over agents), which the GRU uses. ``with_values=False`` is what the
    collector runs (values come after the rollout): the actor only.
    """
    torch.manual_seed(0)
    policies = {
        "mlp": MLPActorCritic(obs_dim, act_dim),
        "ssm": SSMActorCritic(obs_dim, act_dim),
        "ssm-1": SSMActorCritic(obs_dim, act_dim, num_layers=1),
        "ssm-shared": SSMActorCritic(obs_dim, act_dim, shared_trunk=True),
        "gru": GRUActorCritic(obs_dim, act_dim),
    }

    def rollout(policy: nn.Module, generic: bool) -> Callable[[], None]:
        params = {n: p.detach().unsqueeze(0).repeat(agents, *[1] * p.dim()) for n, p in policy.named_parameters()}
        obs = torch.randn(agents, envs, obs_dim)
        resets = torch.zeros(agents, envs, dtype=torch.bool)

        @torch.inference_mode()  # as the collector's stepping loop
        def run() -> None:
            # Preparing the step is part of the cost: it runs once per rollout.
            if generic:
                acting = GenericActingStep(policy, params, agents, envs)
            else:
                acting = policy.acting_step(params, agents, envs, with_values=with_values)
            state = acting.initial_state()
            for _ in range(steps):
                state = acting(obs, state, resets).state

        return run

    candidates = {name: rollout(p, generic=False) for name, p in policies.items()}
    candidates.update({f"{name} vmap": rollout(policies[name], generic=True) for name in ("mlp", "ssm")})
    secs = interleaved(candidates, repeats)
    return {name: s / (steps * agents * envs) * 1e6 for name, s in secs.items()}


def bench_vs_gru(batch: int, length: int, width: int, repeats: int) -> dict[str, float]:
    """Forward+backward seconds: S5 layer (parallel scan) vs torch.nn.GRU (fused C++ loop)."""
    torch.manual_seed(0)
    s5, gru = S5(width, width), nn.GRU(width, width, batch_first=True)
    u = torch.randn(batch, length, width, requires_grad=True)
    return interleaved(
        {
            "S5 (parallel scan)": lambda: s5(u)[0].square().mean().backward(),
            "torch.nn.GRU": lambda: gru(u)[0].square().mean().backward(),
        },
        repeats,
    )


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    batch, length, width = (50, 200, 128) if args.quick else (200, 500, 128)
    repeats = 3 if args.quick else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results: dict[str, object] = {}

    print(f"\n1. S5 layer forward+backward, B={batch} T={length} H=P={width} (median s)")
    scan = bench_scan(batch, length, width, repeats)
    for name, s in scan.items():
        print(f"   {name:16s} {s * 1e3:9.1f} ms   {s / scan['parallel scan']:5.1f}x the scan")
    small = bench_scan(10, length, width, repeats)
    print(f"   same at B=10: scan {small['parallel scan'] * 1e3:.1f} ms, sequential loop "
          f"{small['sequential loop'] / small['parallel scan']:.1f}x, step loop {small['step loop'] / small['parallel scan']:.1f}x")
    results["scan"], results["scan_b10"] = scan, small

    agents = 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the collector: the env workers own the other cores
    for envs, with_values in ((10, False), (2, False), (10, True)):
        what = "actor and critic" if with_values else "actor only, as the collector acts"
        print(f"\n2. Rollout acting step, {what} (K={agents} agents x E={envs} envs, per-agent parameters, 1 thread), us per agent-step")
        step = bench_rollout_step(agents, envs, 39, 4, steps=50 if args.quick else 200, repeats=repeats, with_values=with_values)
        for name, us in step.items():
            print(f"   {name:10s} {us:7.2f} us   {us / step['mlp']:4.2f}x the MLP")
        results[f"rollout_step_us_e{envs}{'_values' if with_values else ''}"] = step
    torch.set_num_threads(threads)
    sizes = {
        "mlp": param_count(MLPActorCritic(39, 4)),
        "ssm": param_count(SSMActorCritic(39, 4)),
        "ssm-1": param_count(SSMActorCritic(39, 4, num_layers=1)),
        "ssm-shared": param_count(SSMActorCritic(39, 4, shared_trunk=True)),
        "gru": param_count(GRUActorCritic(39, 4)),
    }
    print("   parameters: " + ", ".join(f"{n} {c}" for n, c in sizes.items()) + " (ssm-1: num_layers=1)")

    print(f"\n3. Training forward+backward vs torch.nn.GRU, B={batch} T={length} H={width} (median s)")
    vs = bench_vs_gru(batch, length, width, repeats)
    for name, s in vs.items():
        print(f"   {name:18s} {s * 1e3:9.1f} ms")
    print(f"   S5 / GRU time ratio: {vs['S5 (parallel scan)'] / vs['torch.nn.GRU']:.2f}")
    results["vs_gru"] = vs
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
