"""Whole-run memory of ``python cli.py fit``: the learner's peak RSS and the peak PSS of all its processes.

Issue 15's targets: ``configs/ml10.yaml`` <= 8 GB PSS for the whole run, ``configs/ml45.yaml`` <= 12 GB.
Runs the real command for one meta-iteration and one validation (``--trainer.max_epochs 1
--trainer.check_val_every_n_epoch 1``: collection, adaptation, update and evaluation rollouts, the
phases whose peaks add up) in a temporary root dir and MLflow store, and samples every 0.5 s the
proportional set size (PSS: shared pages split between the processes that map them, so the sum is
what the run takes from the machine) of the command and all its descendants (env workers).

Usage: python benchmarks/bench_run_memory.py [--quick] [--config configs/ml10.yaml] [-- extra cli flags]
  --quick: configs/ml1.yaml instead (~1-2 min; ML10 takes ~3)
Memory does not depend on timing: this may run beside another job (if the RAM allows).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metarl_lightning.threads import stat_fields

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from ``/proc/*/stat`` parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(stat_fields(entry / "stat")[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def _kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass  # the process ended between listing and reading
    return 0


def run(config: str, extra: list[str]) -> dict[str, float]:
    """Peak tree PSS, learner peak RSS (``VmHWM``) and process count of one short fit, in GB."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "cli.py", "fit", "--config", config, "--trainer.max_epochs", "1",
                   "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", tmp,
                   "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp}/mlflow.db",
                   *extra]
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak_pss, learner_hwm, processes = 0, 0, 0
        while child.poll() is None:
            pids = descendants(child.pid)
            peak_pss = max(peak_pss, sum(_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids))
            learner_hwm = max(learner_hwm, _kb(Path(f"/proc/{child.pid}/status"), "VmHWM:"))
            processes = max(processes, len(pids))
            time.sleep(0.5)
        if child.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{child.stderr.read()[-3000:]}")
    return {"pss_gb": peak_pss / 1e6, "learner_rss_gb": learner_hwm / 1e6, "processes": processes,
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="configs/ml1.yaml instead of configs/ml10.yaml")
    parser.add_argument("--config", default=None)
    parser.add_argument("extra", nargs="*", help="more cli.py flags (after --), e.g. --model.agent_chunk_size 5")
    args = parser.parse_args()
    config = args.config or ("configs/ml1.yaml" if args.quick else "configs/ml10.yaml")
    result = run(config, args.extra)
    print("| run | learner peak RSS | whole-run peak PSS | processes | wall (one iteration + validation) |")
    print(f"| {config} {' '.join(args.extra)} | {result['learner_rss_gb']:.2f} GB | {result['pss_gb']:.2f} GB "
          f"| {result['processes']} | {result['wall_s']:.0f} s |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
