"""GPU check for a lent GPU machine (under 5 minutes): one short fit on ``cuda`` with 1 device.

The policy, rollout tensors and meta-update live on the GPU; environments stay on the CPU. Prints
env steps/s per meta-iteration for 2-D navigation (policy-bound) and, if Meta-World is installed,
ML1 reach-v3 (env-bound), each with the same run on CPU for comparison.

Usage: python benchmarks/gpu_check.py [--epochs 5]
"""

from __future__ import annotations

import argparse

import torch

from common import measure_fit

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import SSMActorCritic


def fit(accelerator: str, data: MetaTaskDataModule, epochs: int) -> float:
    policy = SSMActorCritic(data.observation_dim, data.action_dim, hidden_dim=128)
    return measure_fit(MetaRLModule(policy), data, epochs, accelerator=accelerator, devices=1).median_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    accelerators = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(accelerators) == 1:
        print("no CUDA device visible: CPU numbers only")
    cases = {
        "nav2d": lambda: MetaTaskDataModule("nav2d", meta_batch_size=40, rollouts_per_task=20),
        "ML1 reach-v3": lambda: MetaTaskDataModule("ML1", env_name="reach-v3", meta_batch_size=10, rollouts_per_task=2,
                                                   envs_per_task=2, max_episode_steps=200),
    }
    for name, make in cases.items():
        for accelerator in accelerators:
            print(f"{name:14} {accelerator:5} {fit(accelerator, make(), args.epochs):10.0f} env steps/s", flush=True)


if __name__ == "__main__":
    main()
