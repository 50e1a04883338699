"""Env steps/s of 2 DDP ranks vs 1 rank on this machine (CPU processes, gloo), with Meta-World envs.

Each rank builds its own env workers and collects its shard of the meta-batch; the reported rate
counts the steps of all ranks. Two layouts are measured:
  * default workers (cores // ranks per rank): the same machine split differently;
  * one env worker per rank: each rank is a learner + worker pair, so 2 ranks run twice the workers.
Target on a 2-core box: >= 1.6x.

Usage: python benchmarks/bench_ddp.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import measure_fit

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic


def run(devices: int, epochs: int, workers: int | None) -> None:
    torch.set_num_threads(1)
    data = MetaTaskDataModule("ML1", env_name="reach-v3", meta_batch_size=8, rollouts_per_task=2, envs_per_task=2,
                              max_episode_steps=150, num_env_workers=workers)
    module = MetaRLModule(MLPActorCritic(39, 4), ppo_epochs=2)
    meter = measure_fit(module, data, epochs, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
    if module.trainer.is_global_zero:
        print(json.dumps({"rate": meter.median_rate}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    # internal: one measurement in a fresh process (DDP re-launches the script per rank)
    parser.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = 4 if args.quick else 8
    if args.devices:
        run(args.devices, epochs, args.workers)
        return
    for label, workers in (("default workers (cores // ranks)", None), ("1 env worker per rank", 1)):
        rates = {}
        for devices in (1, 2):
            command = [sys.executable, str(Path(__file__)), "--devices", str(devices)]
            command += (["--quick"] if args.quick else []) + ([] if workers is None else ["--workers", str(workers)])
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            rates[devices] = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])["rate"]
        print(f"{label}: 1 rank {rates[1]:.0f}, 2 ranks {rates[2]:.0f} env steps/s = {rates[2] / rates[1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
