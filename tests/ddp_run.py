"""Script run by tests/test_distributed.py: meta-train nav2d and dump per-rank parameters and gradients.

Usage: python tests/ddp_run.py OUT_DIR DEVICES [STRATEGY] [linear | normalized]
Lightning's ``ddp`` strategy re-launches this script once per extra rank. ``linear``: a linear
baseline with ``value_coef: 0`` and weight decay (the critic is never run: its grads stay None).
``normalized``: observation normalisation on (its statistics are dumped per rank too).
"""

import sys
from pathlib import Path

import lightning as L
import torch

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule
from metarl_lightning.policies import MLPActorCritic

# Run as a script (and re-launched per rank by Lightning), so the repository root is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import quiet_trainer  # noqa: E402


class DumpGradients(L.Callback):
    """Save every rank's meta-gradient of the first optimiser step and its final parameters."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.saved_first = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.saved_first:
            grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()}
            torch.save(grads, self.out / f"grads_rank{trainer.global_rank}.pt")
            self.saved_first = True

    def on_train_end(self, trainer, pl_module) -> None:
        params = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}
        torch.save(params, self.out / f"params_rank{trainer.global_rank}.pt")
        if pl_module.obs_normalizer is not None:
            stats = {k: v.detach().clone() for k, v in pl_module.obs_normalizer.state_dict().items()}
            torch.save(stats, self.out / f"obs_stats_rank{trainer.global_rank}.pt")


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    strategy = sys.argv[3] if len(sys.argv) > 3 else "ddp"
    modes = {"linear": dict(baseline="linear", value_coef=0.0, weight_decay=0.1), "normalized": dict(normalize_observations=True)}
    extra = modes[sys.argv[4]] if len(sys.argv) > 4 else {}
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    data = MetaTaskDataModule("nav2d", meta_batch_size=8, rollouts_per_task=4, max_episode_steps=50, seed=3)
    # max_grad_norm off: the comparison is of the raw averaged meta-gradient.
    module = MetaRLModule(MLPActorCritic(2, 2, hidden_dim=16), meta_lr=1e-2, inner_lr=0.5, ppo_epochs=2, max_grad_norm=None, **extra)
    trainer = quiet_trainer(3, [DumpGradients(out)], devices=devices, strategy=strategy if devices > 1 else "auto")
    trainer.fit(module, data)


if __name__ == "__main__":
    main()
