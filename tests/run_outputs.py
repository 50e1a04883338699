"""Helpers of the run-output tests: the CLI in a subprocess, and checks of results.json and the PNG.

Not a test module (no ``test_`` prefix): imported by test_resume.py, test_mlflow.py, test_callbacks.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "cli.py")
NAV2D = str(REPO / "configs" / "nav2d.yaml")

# nav2d shrunk to ~0.3 s per epoch: 2 tasks x 2 rollouts x 20 steps, evaluation every 2nd epoch.
TINY = [
    "--config", NAV2D,
    "--data.meta_batch_size", "2",
    "--data.rollouts_per_task", "2",
    "--data.num_eval_tasks", "2",
    "--data.max_episode_steps", "20",
    "--model.ppo_epochs", "2",
    "--trainer.check_val_every_n_epoch", "2",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


def cli_args(subcommand: str, root: Path, tracking_uri: str, *extra: str) -> list[str]:
    """``python cli.py <subcommand>`` on the tiny nav2d config, every output under ``root``."""
    return [
        sys.executable, CLI, subcommand, *TINY,
        "--trainer.default_root_dir", str(root / "run"),
        "--trainer.logger.init_args.tracking_uri", tracking_uri,
        *extra,
    ]  # fmt: skip


def cli_env() -> dict[str, str]:
    """The environment without anything that would redirect MLflow outside the test's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run to completion; fail with the output's tail when the exit status is not 0."""
    done = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def start_cli(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start in the background, output to ``log``."""
    return subprocess.Popen(args, cwd=cwd, env=cli_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until ``path`` exists; fail early if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"process exited ({process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


# ------------------------------------------------------------------------------- results.json
_NUMBER = (int, float)
_TOP = {
    "schema_version": int,
    "status": str,
    "config": dict,
    "mlflow": (dict, type(None)),
    "epochs_completed": int,
    "env_steps": int,
    "wall_time_s": _NUMBER,
    "train": list,
    "eval": list,
    "protocol": list,
}
_RETURNS = ("pre_adaptation_return", "post_adaptation_return")
_SUCCESS = ("pre_adaptation_success", "post_adaptation_success")
_TRAIN_ENTRY = {"epoch": int, "step": int, "env_steps": int, "wall_time_s": _NUMBER, **{k: _NUMBER for k in (*_RETURNS, *_SUCCESS, "meta_loss", "policy_loss", "value_loss", "entropy")}}
_EVAL_ENTRY = {"epoch": int, "step": int, "env_steps": int, **{k: _NUMBER for k in (*_RETURNS, *_SUCCESS)}}
_PROTOCOL_ENTRY = {"epoch": int, "step": int, "env_steps": int, "wall_time_s": _NUMBER, "success_rate": _NUMBER,
                   "return": _NUMBER, "success_per_task": dict, "counts": dict}


def _check_fields(obj: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    assert set(obj) == set(schema), f"{where}: keys {sorted(obj)} != {sorted(schema)}"
    for key, kind in schema.items():
        assert isinstance(obj[key], kind) and not isinstance(obj[key], bool), f"{where}.{key}: {obj[key]!r} is not {kind}"


def validate_results(results: dict[str, Any]) -> None:
    """The results.json schema, version 1 (see callbacks/results.py)."""
    _check_fields(results, _TOP, "results")
    assert results["schema_version"] == 1
    assert results["status"] in ("running", "finished", "killed", "failed")
    assert {"trainer", "model", "data"} <= set(results["config"]), "config must be the full resolved config"
    if results["mlflow"] is not None:
        assert isinstance(results["mlflow"]["run_id"], str) and isinstance(results["mlflow"]["tracking_uri"], str)
    assert results["epochs_completed"] == len(results["train"])
    for i, entry in enumerate(results["train"]):
        _check_fields(entry, _TRAIN_ENTRY, f"train[{i}]")
        assert entry["epoch"] == i, "one train entry per epoch, in order"
        assert all(0.0 <= entry[k] <= 1.0 for k in _SUCCESS)
    for i, entry in enumerate(results["eval"]):
        _check_fields(entry, _EVAL_ENTRY, f"eval[{i}]")
        assert all(0.0 <= entry[k] <= 1.0 for k in _SUCCESS)
    for i, entry in enumerate(results["protocol"]):
        _check_fields(entry, _PROTOCOL_ENTRY, f"protocol[{i}]")
        assert 0.0 <= entry["success_rate"] <= 1.0 and entry["counts"]["protocol"] in ("official", "custom")
    env_steps = [e["env_steps"] for e in results["train"]]
    assert env_steps == sorted(env_steps) and (not env_steps or env_steps[-1] == results["env_steps"])


def check_plot(path: Path) -> None:
    """A decodable PNG with real content (many colours, not one flat image)."""
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 400, pixels.shape
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05, "blank image"
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20, "too few colours to be a plot"
    # Lines were drawn: a meaningful share of pixels is neither white nor near-white.
    assert (rgb.min(axis=1) < 0.8).mean() > 0.01
