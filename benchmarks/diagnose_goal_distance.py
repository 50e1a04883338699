"""How far from the goal does an adapted ML1 reach policy end? Mean action against sampled actions.

A diagnosis for the gap between the official protocol (the adapted policy's *mean* action) and the
stochastic success of the same policy (docs/results.md, "Longer training"): runs Meta-World's
``metalearning_evaluation`` unchanged on a checkpoint, once scoring the mean action and once the
sampled actions, and records for every evaluation episode the hand's distance to the hidden goal
(reach-v3's ``info['near_object']``): its minimum over the episode and its value at the end. Success
is a minimum under 5 cm. Prints one table; not part of ``make bench`` (it measures learning, not speed).

    python benchmarks/diagnose_goal_distance.py --config RUN/config.yaml --ckpt RUN/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metarl_lightning.evaluation as evaluation  # noqa: E402
from callbacks.evaluation import MetaWorldEvaluation  # noqa: E402
from cli import MetaRLCLI  # noqa: E402
from metarl_lightning.data import MetaTaskDataModule  # noqa: E402
from metarl_lightning.module import MetaRLModule  # noqa: E402

SUCCESS_RADIUS = 0.05
# The published counts, as the callback's `protocol: official` runs them (one env per class).
ADAPTATION_EPISODES = MetaWorldEvaluation.OFFICIAL_ML["adaptation_episodes"]
EVALUATION_EPISODES = MetaWorldEvaluation.OFFICIAL_ML["evaluation_episodes"]


class DistanceRecorder:
    """Wraps the eval vector env: per env, the min and last ``near_object`` of every finished episode."""

    def __init__(self, envs: Any) -> None:
        self._envs = envs
        self.episodes: list[list[tuple[float, float]]] = [[] for _ in range(envs.num_envs)]
        self._min = np.full(envs.num_envs, np.inf)
        self._last = np.full(envs.num_envs, np.nan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._envs, name)

    def _distance(self, infos: dict[str, Any]) -> np.ndarray:
        """``near_object`` per env, NaN where an env has none in ``infos``."""
        if "near_object" not in infos:
            return np.full(self._envs.num_envs, np.nan)
        distance = np.asarray(infos["near_object"], dtype=float)
        mask = np.asarray(infos.get("_near_object", np.ones(self._envs.num_envs, dtype=bool)), dtype=bool)
        return np.where(mask, distance, np.nan)

    def step(self, actions: Any) -> Any:
        obs, rewards, terminated, truncated, infos = self._envs.step(actions)
        # Same-step autoreset: at an episode's last step ``infos`` is the reset's, and the step's own
        # info is under ``final_info`` (the step that reached the goal, for a success).
        done = np.logical_or(terminated, truncated)
        distance = self._distance(infos)
        present = np.isfinite(distance) & ~done
        if done.any() and "final_info" in infos:
            final = self._distance(infos["final_info"])
            distance = np.where(done, final, distance)
            present |= done & np.isfinite(final)
        self._min = np.where(present, np.minimum(self._min, distance), self._min)
        self._last = np.where(present, distance, self._last)
        for i in np.flatnonzero(done):
            self.episodes[i].append((float(self._min[i]), float(self._last[i])))
            self._min[i], self._last[i] = np.inf, np.nan
        return obs, rewards, terminated, truncated, infos


def run(module: MetaRLModule, seed: int, num_goals: int | None, sample: bool) -> dict[str, float]:
    """The protocol on ``num_goals`` test goals; distances of the evaluation episodes only."""
    recorders: list[DistanceRecorder] = []
    make = evaluation.make_eval_envs

    def recording_envs(*args: Any, **kwargs: Any) -> Any:
        recorders.append(DistanceRecorder(make(*args, **kwargs)))
        return recorders[-1]

    evaluation.make_eval_envs = recording_envs
    try:
        result = evaluation.evaluate_meta_learning(
            module, "ML1", "reach-v3", seed=seed, num_evals=num_goals, adaptation_episodes=ADAPTATION_EPISODES,
            evaluation_episodes=EVALUATION_EPISODES, sample_eval_actions=sample,
        )
    finally:
        evaluation.make_eval_envs = make
    (recorder,) = recorders
    # One env: per goal, the adaptation episodes then the evaluation episodes (metaworld's order).
    per_goal = ADAPTATION_EPISODES + EVALUATION_EPISODES
    episodes = recorder.episodes[0]
    evals = [e for g in range(0, len(episodes) - per_goal + 1, per_goal) for e in episodes[g + ADAPTATION_EPISODES : g + per_goal]]
    mins = np.array([e[0] for e in evals])
    ends = np.array([e[1] for e in evals])
    return {
        "success_rate": result["success_rate"],
        "episodes": len(evals),
        "min_dist_median_cm": 100 * float(np.median(mins)),
        "end_dist_median_cm": 100 * float(np.median(ends)),
        "min_5_to_10cm": float(np.mean((mins >= SUCCESS_RADIUS) & (mins < 2 * SUCCESS_RADIUS))),
        "min_over_10cm": float(np.mean(mins >= 2 * SUCCESS_RADIUS)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run's config.yaml")
    parser.add_argument("--ckpt", required=True, help="a checkpoint of that run")
    parser.add_argument("--num-goals", type=int, default=None, help="test goals (default: all 50)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = yaml.safe_load(Path(args.config).read_text())
    for key in ("ckpt_path", "weights_only"):  # the fit subcommand's own keys: this only builds the classes
        config.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "config.yaml"
        bare.write_text(yaml.safe_dump(config))
        cli = MetaRLCLI(
            MetaRLModule, MetaTaskDataModule, run=False, save_config_callback=None,
            args=["--config", str(bare), "--trainer.logger", "false", "--trainer.default_root_dir", tmp],
        )
    module = cli.model
    module.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=False)["state_dict"])
    seed = int(cli.datamodule.seed)
    print(f"{'eval actions':12s} {'success':>8s} {'episodes':>8s} {'median min cm':>13s} {'median end cm':>13s} "
          f"{'min 5-10 cm':>11s} {'min > 10 cm':>11s}")
    for sample in (False, True):
        r = run(module, seed, args.num_goals, sample)
        print(f"{'sampled' if sample else 'mean':12s} {r['success_rate']:8.2f} {r['episodes']:8d} "
              f"{r['min_dist_median_cm']:13.1f} {r['end_dist_median_cm']:13.1f} {r['min_5_to_10cm']:11.2f} "
              f"{r['min_over_10cm']:11.2f}")


if __name__ == "__main__":
    main()
