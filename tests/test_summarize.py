"""``python -m metarl_lightning.summarize``: per-run rows and per-recipe seed statistics, read from
the files runs write (synthetic ones for the arithmetic, a real CLI fit for the schema)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from metarl_lightning.summarize import main, read_run, recipes_table, runs_table
from tests.run_outputs import REPO, cli_args, start_cli


def _config(seed: int, outer: str, root: str) -> dict:
    return {
        "seed_everything": seed,
        "trainer": {"max_epochs": 10, "default_root_dir": root, "callbacks": [{"class_path": "x", "every": seed}]},
        "model": {"outer_optimizer": outer, "inner_lr": 0.1},
        "data": {"benchmark": "ML1", "env_name": "reach-v3", "seed": seed},
    }


def _protocol(success: float, split: str = "test") -> dict:
    counts = {"protocol": "official", "num_evals": None, "adaptation_episodes": 10, "evaluation_episodes": 3}
    if split == "train":
        counts["split"] = "train"
    return {"epoch": 9, "env_steps": 1_000_000, "success_rate": success, "counts": counts}


def _write_fit(folder: Path, seed: int, outer: str, posts: list[float], protocol: list[dict]) -> Path:
    folder.mkdir(parents=True)
    results = {
        "schema_version": 1,
        "status": "finished",
        "config": _config(seed, outer, str(folder)),
        "env_steps": 1_000_000,
        "wall_time_s": 600.0,
        "train": [{"epoch": i, "post_adaptation_success": p} for i, p in enumerate(posts)],
        "eval": [{"epoch": 9, "post_adaptation_success": 0.9}],
        "protocol": protocol,
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_runs_and_recipes_match_a_hand_computation(tmp_path):
    posts = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    a0 = _write_fit(tmp_path / "a0", 0, "ppo", posts, [_protocol(0.30), _protocol(0.52), _protocol(0.99, split="train")])
    a1 = _write_fit(tmp_path / "a1", 1, "ppo", posts, [_protocol(0.68)])
    b0 = _write_fit(tmp_path / "b0", 0, "trpo", posts, [_protocol(0.86)])
    runs = [read_run(p) for p in (a0, a1, b0)]

    # the last held-out protocol entry (not the training-goal one), the mean of the last 5 iterations
    assert runs[0].protocol_success == 0.52
    assert runs[0].train_success == pytest.approx(statistics.mean(posts[-5:]))
    assert runs[0].val_success == 0.9 and runs[0].wall_time_min == 10.0
    row = runs_table(runs).splitlines()[2]
    assert "| ML1 reach-v3 | 0 | 1.00M | finished | 0.40 | 0.90 | 0.520 | all goals, 10+3 ep. | 10.0 |" in row

    # seeds of one recipe are grouped (different seed, folder and callbacks), labelled by what differs
    table = recipes_table(runs).splitlines()
    assert len(table) == 4, table
    ppo, trpo = table[2], table[3]
    mean, sd = statistics.mean([0.52, 0.68]), statistics.stdev([0.52, 0.68])
    assert ppo.startswith("| model.outer_optimizer=ppo | fit | 2 | 0, 1 | 0.52, 0.68 |"), ppo
    assert ppo.endswith(f"| {mean:.3f} | {sd:.3f} |"), ppo
    assert trpo.startswith("| model.outer_optimizer=trpo | fit | 1 | 0 | 0.86 | 0.860 | - |"), trpo


def test_a_test_run_from_a_checkpoint_is_its_own_recipe_row(tmp_path):
    fit = _write_fit(tmp_path / "fit", 0, "ppo", [0.5], [_protocol(0.4)])
    test = tmp_path / "test"
    test.mkdir()
    (test / "test_results.json").write_text(
        json.dumps({"schema_version": 1, "stage": "test", "checkpoint": "best.ckpt", "config": _config(0, "ppo", "t"),
                    "metrics": {"post_adaptation_success": 0.3}, "protocol": _protocol(0.26)})
    )  # fmt: skip
    runs = [read_run(fit), read_run(test)]
    assert (runs[1].stage, runs[1].protocol_success, runs[1].status) == ("test", 0.26, "from best.ckpt")
    stages = [line.split(" | ")[1] for line in recipes_table(runs).splitlines()[2:]]
    assert stages == ["fit", "test"]


def test_bad_paths_give_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    for path, words in ((tmp_path / "missing", "no results.json"), (tmp_path / "broken", "not readable as JSON")):
        assert main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}") and words in err and "\n" not in err, err


def test_a_real_fit_summarised_from_the_command_line(tmp_path):
    fits = []
    for seed in (0, 1):  # side by side: the two CLI start-ups are most of the time
        root = tmp_path / f"s{seed}"
        root.mkdir()
        args = cli_args("fit", root, f"sqlite:///{root}/mlflow.db", "--trainer.max_epochs", "2", "--seed_everything", str(seed))
        fits.append(start_cli(args, cwd=root, log=root / "log.txt"))
    for seed, fit in enumerate(fits):
        assert fit.wait(timeout=240) == 0, (tmp_path / f"s{seed}" / "log.txt").read_text()[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "metarl_lightning.summarize", str(tmp_path / "s0" / "run"), str(tmp_path / "s1" / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for seed, line in zip((0, 1), lines[2:4]):
        results = json.loads((tmp_path / f"s{seed}" / "run" / "results.json").read_text())
        steps = f"{results['env_steps'] / 1e6:.2f}M"
        assert f"| nav2d | {seed} | {steps} | finished |" in line, line
    recipe_rows = [line for line in lines[lines.index("") + 3 :] if line.startswith("|")]
    assert len(recipe_rows) == 1 and "| fit | 2 | 0, 1 |" in recipe_rows[0], lines
