"""Time to the first env step of ``python cli.py fit`` (issue 15; target <= 10 s for MT10, warm cache).

Runs the real command (``configs/mt10.yaml`` by default) in a subprocess, one iteration of short
episodes, in a temporary root dir and MLflow store, with ``benchmarks.common.FirstStepTimer``
appended to the trainer's callbacks, and prints the seconds from the command's start to

- ``parsed``: Python, torch, Lightning imported, the config parsed and checked;
- ``setup``: the MLflow run started and the env workers started (the train envs build in them
  meanwhile; the test envs are built by the first evaluation, not here);
- ``first_step``: the module set up, the train envs built (the CLI starts building them before
  Lightning sets up, and this mark waits for them); the first collection starts.

The first run may build the benchmark (its cache, ``~/.cache/metarl_lightning``, is then warm) and
creates the MLflow store; the runs after it read the warm cache and log to that store. Quiet
machine only.

Usage: python benchmarks/bench_startup.py [--quick] [--config configs/mt10.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(config: str, store: str) -> dict[str, float]:
    """The start-up marks (seconds) of one ``cli.py fit`` of ``config`` logging to MLflow ``store``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "METARL_T0": f"{time.time():.6f}", "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "cli.py", "fit", "--config", config, "--trainer.max_steps", "1",
             "--data.max_episode_steps", "10", "--trainer.default_root_dir", tmp,
             "--trainer.logger.init_args.tracking_uri", store,
             "--trainer.callbacks+=benchmarks.common.FirstStepTimer"],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        ).stdout
    # The progress bar's carriage returns may put a mark mid-line.
    return {name: float(seconds) for name, seconds in re.findall(r"STARTUP (\w+) ([0-9.]+)", out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one warm run after the warming one")
    parser.add_argument("--config", default="configs/mt10.yaml")
    parser.add_argument("--repeats", type=int, default=3, help="runs after the first (warm cache)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        # The first run also creates the MLflow store (schema migrations, seconds); the warm runs
        # log to it as a user's existing store.
        store = f"sqlite:///{tmp}/mlflow.db"
        first = one_run(args.config, store)
        warm = [one_run(args.config, store) for _ in range(repeats)]
    print(f"{args.config}: seconds from the command's start (first run, then the median of {repeats} warm-cache run(s))")
    print("| mark | first run | warm cache |")
    print("|---|---:|---:|")
    for name in ("parsed", "setup", "first_step"):
        print(f"| {name} | {first[name]:.1f} | {statistics.median(w[name] for w in warm):.1f} |")


if __name__ == "__main__":
    main()
