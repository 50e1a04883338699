"""Tables of finished runs, and of the seeds of each recipe: ``python -m metarl_lightning.summarize RUN...``.

Reads the files a run folder already has (``results.json`` of a fit, ``test_results.json`` /
``validate_results.json`` of a ``test`` / ``validate`` run) and prints two Markdown tables:

* one row per run: benchmark, seed, env steps, status, training success after adaptation (mean of
  the last 5 iterations), the last held-out validation, the last Meta-World protocol result on the
  held-out split with the counts it ran with, wall time;
* one row per recipe: runs whose configs differ only in the seed (and in where they write) are the
  seeds of one recipe; each recipe is labelled by the config values that set it apart from the
  others, with the protocol success per seed, its mean and sample standard deviation.

So an ablation over seeds is summarised the way docs/results.md reports it::

    python -m metarl_lightning.summarize runs/ml1_s0 runs/ml1_s1 runs/ml1_trpo_s0 runs/ml1_trpo_s1
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metarl_lightning.config_tree import flatten_config
from metarl_lightning.protocol_split import is_train_split

RESULT_FILES = ("results.json", "test_results.json", "validate_results.json")
# Config keys that do not change what a run learns: the seed (what a recipe is run over), where it
# writes, how it is resumed, and when and how it is evaluated and logged. Runs that differ only here
# are seeds of one recipe.
_NOT_RECIPE_PREFIXES = (
    "seed_everything",
    "data.seed",
    "trainer.default_root_dir",
    "trainer.logger",
    "trainer.callbacks",
    "trainer.check_val_every_n_epoch",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "ckpt_path",
    "mlflow",
    "results",
    "progress_bar",
    "verbose",
)
_LAST_TRAIN_ITERATIONS = 5


class SummaryError(ValueError):
    """A path that holds no run results, or results this reader does not know."""


@dataclass
class RunSummary:
    """What one run folder reports (``None`` where the run has no such number)."""

    path: str
    stage: str  # fit | test | validate
    benchmark: str
    seed: int | None
    env_steps: int | None
    status: str
    train_success: float | None
    val_success: float | None
    protocol_success: float | None
    protocol_counts: str
    wall_time_min: float | None
    config: dict[str, Any]


def _recipe_leaves(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config's leaves that set what a run learns (everything but the seed, paths, evaluation)."""
    return {k: v for k, v in flatten_config(dict(config)).items() if not k.startswith(_NOT_RECIPE_PREFIXES)}


def recipe_key(config: Mapping[str, Any]) -> str:
    """Equal for runs of one recipe: its leaves, in a canonical JSON form."""
    return json.dumps(_recipe_leaves(config), sort_keys=True, default=str)


def _benchmark(config: Mapping[str, Any]) -> str:
    data = config.get("data") or {}
    name = str(data.get("benchmark", "?"))
    env = data.get("env_name")
    return f"{name} {env}" if env else name


def _counts(entry: Mapping[str, Any]) -> str:
    """The protocol's counts in a few words: ``official`` (all goals) or ``N goals``, + episodes."""
    counts = entry.get("counts") or {}
    goals = "all goals" if counts.get("num_evals") is None else f"{counts['num_evals']} goals"
    episodes = counts.get("adaptation_episodes"), counts.get("evaluation_episodes")
    return f"{goals}, {episodes[0]}+{episodes[1]} ep." if None not in episodes else goals


def _held_out(protocol: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Protocol entries on the held-out split (``split: train`` entries are meta-train numbers)."""
    return [p for p in protocol if not is_train_split(p)]


def read_run(path: str | Path) -> RunSummary:
    """Summarise the run folder ``path`` (or one of its result files).

    Raises:
        SummaryError: no result file there, or not a JSON object of a known schema.
    """
    path = Path(path)
    files = [path] if path.is_file() else [path / name for name in RESULT_FILES if (path / name).is_file()]
    if not files:
        raise SummaryError(f"{path}: no {', '.join(RESULT_FILES)} there")
    try:
        results = json.loads(files[0].read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SummaryError(f"{files[0]}: not readable as JSON ({err})") from None
    if not isinstance(results, dict) or results.get("schema_version") != 1:
        raise SummaryError(f"{files[0]}: not a results file of schema_version 1")
    config = results.get("config") or {}
    seed = config.get("seed_everything")
    common = {"path": str(path), "benchmark": _benchmark(config), "seed": seed if isinstance(seed, int) else None}
    if "train" in results:  # a fit's results.json
        train = results["train"][-_LAST_TRAIN_ITERATIONS:]
        posts = [e["post_adaptation_success"] for e in train if e.get("post_adaptation_success") is not None]
        evals = results.get("eval") or []
        protocol = _held_out(results.get("protocol") or [])
        wall = results.get("wall_time_s")
        return RunSummary(
            **common,
            stage="fit",
            env_steps=results.get("env_steps"),
            status=str(results.get("status", "?")),
            train_success=sum(posts) / len(posts) if posts else None,
            val_success=evals[-1].get("post_adaptation_success") if evals else None,
            protocol_success=protocol[-1]["success_rate"] if protocol else None,
            protocol_counts=_counts(protocol[-1]) if protocol else "",
            wall_time_min=None if wall is None else wall / 60,
            config=config,
        )
    protocol_entry = results.get("protocol")
    return RunSummary(
        **common,
        stage=str(results.get("stage", "test")),
        env_steps=None,
        status=f"from {results.get('checkpoint', '?')}",
        train_success=None,
        val_success=(results.get("metrics") or {}).get("post_adaptation_success"),
        protocol_success=protocol_entry["success_rate"] if protocol_entry else None,
        protocol_counts=_counts(protocol_entry) if protocol_entry else "",
        wall_time_min=None,
        config=config,
    )


def mean_and_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``n - 1``; ``None`` for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_labels(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """For each recipe, the config values that differ between the recipes (``key=value, ...``)."""
    flats = [_recipe_leaves(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    return [", ".join(f"{k}={f.get(k)}" for k in varying) or "(one recipe)" for f in flats]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def runs_table(runs: Sequence[RunSummary]) -> str:
    """One Markdown row per run."""
    lines = [
        "| run | benchmark | seed | env steps | status | train success (post, last 5 it.) | validation (post) | protocol success | protocol counts | wall min |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in runs:
        steps = "-" if r.env_steps is None else f"{r.env_steps / 1e6:.2f}M"
        lines.append(
            f"| {r.path} | {r.benchmark} | {'-' if r.seed is None else r.seed} | {steps} | {r.status} | "
            f"{_fmt(r.train_success)} | {_fmt(r.val_success)} | {_fmt(r.protocol_success, 3)} | "
            f"{r.protocol_counts} | {_fmt(r.wall_time_min, 1)} |"
        )
    return "\n".join(lines)


def recipes_table(runs: Sequence[RunSummary]) -> str:
    """One Markdown row per recipe: its seeds' protocol success, mean and sample sd."""
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for r in runs:
        groups.setdefault((recipe_key(r.config), r.stage), []).append(r)
    members = list(groups.values())
    labels = group_labels([g[0].config for g in members])
    lines = [
        "| recipe (what differs) | stage | runs | seeds | protocol success per seed | mean | sd |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for label, group in zip(labels, members):
        scored = [r for r in group if r.protocol_success is not None]
        per_seed = ", ".join(f"{_fmt(r.protocol_success)}" for r in scored) or "-"
        mean, sd = mean_and_sd([r.protocol_success for r in scored]) if scored else (None, None)
        seeds = ", ".join("-" if r.seed is None else str(r.seed) for r in group)
        lines.append(f"| {label} | {group[0].stage} | {len(group)} | {seeds} | {per_seed} | {_fmt(mean, 3)} | {_fmt(sd, 3)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print both tables for the run folders on the command line; 2 with one error line on bad input."""
    parser = argparse.ArgumentParser(prog="python -m metarl_lightning.summarize", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (or result files): results.json, test_results.json, validate_results.json")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(p) for p in args.runs]
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(runs_table(runs))
    print()
    print(recipes_table(runs))
    return 0


if __name__ == "__main__":
    # Piped into `head` and the like: end quietly when the reader closes, as other shell tools do.
    if hasattr(signal, "SIGPIPE"):  # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
