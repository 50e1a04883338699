"""Peak memory of the meta-update (second-order MAML through the S5 scan) with and without agent chunks.

Usage:
    python benchmarks/bench_learner_memory.py             # ml10.yaml's learner: 20 agents x 5 envs x 1000 steps
    python benchmarks/bench_learner_memory.py --quick     # 4 agents x 5 envs x 1000 steps (~1 min)
    python benchmarks/bench_learner_memory.py --agents 10 --envs 10 --steps 500   # ml1.yaml's

Each setting runs in a fresh process (peak RSS, ``ru_maxrss``, cannot be reset): rollouts with the
config's shapes and random contents (memory depends on shapes only), one outer loss with the inner
step (second order) and its backward, as one PPO epoch of ``MetaRLModule.training_step`` does. Reports
the peak RSS minus the process's RSS before the update, per chunk size, and the largest difference
of the meta-gradient from the one-piece one (it must be float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _one(agents: int, envs: int, steps: int, chunk: int | None) -> dict:
    """Run in this process; print the measurements as JSON."""
    from metarl_lightning.module import MetaRLModule
    from metarl_lightning.policies import SSMActorCritic
    from metarl_lightning.rollout_data import Rollout

    torch.manual_seed(0)
    obs_dim, act_dim = 39, 4
    policy = SSMActorCritic(obs_dim, act_dim, hidden_dim=64, state_dim=64, num_layers=2, init_log_std=0.0)
    module = MetaRLModule(policy, inner_parameters="head", baseline="linear", gae_lambda=1.0, agent_chunk_size=chunk)
    module._trainer = None
    shape = (agents, envs, steps)
    resets = torch.zeros(shape, dtype=torch.bool)
    resets[..., ::500] = True

    def rollout() -> Rollout:
        with torch.no_grad():
            out = Rollout(
                observations=torch.randn(*shape, obs_dim), actions=torch.randn(*shape, act_dim),
                log_probs=torch.randn(shape) - 5, values=torch.randn(shape), next_values=torch.randn(shape),
                rewards=torch.rand(shape), terminated=torch.zeros(shape, dtype=torch.bool),
                truncated=resets.roll(-1, dims=-1), resets=resets,
                initial_state=policy.initial_state(agents * envs).reshape(agents, envs, *policy.initial_state(1).shape[1:]),
                episode_return=torch.zeros(agents), episode_success=torch.zeros(agents),
            )  # fmt: skip
            out.compute_advantages(0.99, 1.0, 1.0, "linear")
        return out

    support, query = rollout(), rollout()
    module.manual_backward = lambda loss: loss.backward()  # no Trainer: plain autograd
    module._no_backward_sync = contextlib.nullcontext
    before = _rss_bytes()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = module._outer_loss(support, query, backward=chunk is not None)
    if chunk is None:
        loss.total.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grads = torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])
    return {"chunk": chunk, "update_peak_gb": (peak - max(before, base)) / 2**30, "process_peak_gb": peak / 2**30,
            "loss": float(loss.total), "grad": grads.tolist()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--agents", type=int, default=None)
    parser.add_argument("--envs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--chunks", type=str, default="none,5,1")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    agents = args.agents or (4 if args.quick else 20)
    if args.child is not None:
        chunk = None if args.child == "none" else int(args.child)
        torch.set_num_threads(1)
        print(json.dumps(_one(agents, args.envs, args.steps, chunk)))
        return
    rows = []
    for chunk in args.chunks.split(","):
        cmd = [sys.executable, __file__, "--child", chunk, "--agents", str(agents), "--envs", str(args.envs), "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = torch.tensor(rows[0]["grad"])
    print(f"meta-update of {agents} agents x {args.envs} envs x {args.steps} steps (S5 2x64, second order, head-only inner step)")
    print(f"{'agent chunk':>12} {'update peak GB':>15} {'process peak GB':>16} {'max |grad - one-piece|':>23}")
    for row in rows:
        diff = (torch.tensor(row["grad"]) - reference).abs().max().item()
        print(f"{str(row['chunk']):>12} {row['update_peak_gb']:>15.2f} {row['process_peak_gb']:>16.2f} {diff:>23.2e}")


if __name__ == "__main__":
    main()
