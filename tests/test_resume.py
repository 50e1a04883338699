"""Exact resume: a fit killed with SIGKILL and resumed with ``--ckpt_path last`` equals an uninterrupted fit.

Three CLI runs on tiny nav2d (same seed, 4 epochs): uninterrupted; killed -9 as soon as its first
``last.ckpt`` exists (mid-run; the kill may land anywhere after that); resumed. The resumed run must
end with the same parameters and optimiser state, continue the *same* MLflow run, and leave the same
metric histories and results.json (timings aside).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from mlflow import MlflowClient

from tests.run_outputs import cli_args, run_cli, start_cli, validate_results, wait_for_file

EPOCHS = "4"
# The learner's thread count sets the float rounding of gradient sums; the default picks it from the
# machine's load at every iteration, so an exact comparison fixes it.
THREADS = ("--data.learner_threads", "1")
# Wall-clock measurements differ between any two runs; everything else must match.
TIMING_METRICS = {"train/env_steps_per_s", "train/collect_fraction", "steps_per_s"}


def _histories(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """metric -> {step: value}; a step logged twice (killed and resumed process) must agree with itself."""
    out: dict[str, dict[int, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key in TIMING_METRICS:
            continue
        series: dict[int, float] = {}
        for m in client.get_metric_history(run_id, key):
            assert series.setdefault(m.step, m.value) == m.value, f"{key} step {m.step} logged twice with different values"
        out[key] = series
    return out


def _checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_kill9_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir()
    interrupted.mkdir()
    run_cli(cli_args("fit", reference, uri, "--trainer.max_epochs", EPOCHS, *THREADS), cwd=tmp_path)

    last = interrupted / "run" / "checkpoints" / "last.ckpt"
    process = start_cli(cli_args("fit", interrupted, uri, "--trainer.max_epochs", EPOCHS, *THREADS), cwd=tmp_path, log=tmp_path / "killed.log")
    try:
        wait_for_file(last, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run must die by SIGKILL, not finish"
    killed = _checkpoint_state(last)  # loadable right after kill -9 (atomic writes)
    assert killed["epoch"] < int(EPOCHS) - 1, "killed before the end"
    killed_run = killed["mlflow"]["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(killed_run).info.status == "RUNNING"  # kill -9 runs no code; the resume takes it over

    run_cli(cli_args("fit", interrupted, uri, "--trainer.max_epochs", EPOCHS, "--ckpt_path", "last", *THREADS), cwd=tmp_path)

    ref_ckpt, res_ckpt = _checkpoint_state(reference / "run/checkpoints/last.ckpt"), _checkpoint_state(last)
    assert res_ckpt["mlflow"]["run_id"] == killed_run, "the resume must continue the same MLflow run"
    assert ref_ckpt["global_step"] == res_ckpt["global_step"] and ref_ckpt["epoch"] == res_ckpt["epoch"]
    for name, tensor in ref_ckpt["state_dict"].items():
        assert torch.equal(tensor, res_ckpt["state_dict"][name]), f"parameter {name} differs"
    ref_opt, res_opt = ref_ckpt["optimizer_states"][0]["state"], res_ckpt["optimizer_states"][0]["state"]
    for index, state in ref_opt.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(res_opt[index][key])), f"optimizer state {index}.{key} differs"

    ref_run = ref_ckpt["mlflow"]["run_id"]
    resumed = client.get_run(killed_run)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["metarl.resume_count"] == "1"
    assert _histories(client, killed_run) == _histories(client, ref_run)

    ref_results = json.loads((reference / "run/results.json").read_text())
    res_results = json.loads((interrupted / "run/results.json").read_text())
    for results in (ref_results, res_results):
        validate_results(results)
        for entry in results["train"]:
            entry.pop("wall_time_s")
    assert res_results["train"] == ref_results["train"]
    assert res_results["eval"] == ref_results["eval"]
    assert res_results["env_steps"] == ref_results["env_steps"]
