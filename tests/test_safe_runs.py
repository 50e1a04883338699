"""Nothing a user types can damage a run: refused starts change nothing, one live fit per folder,
the checkpoint-vs-command-line rule, and a tracking server that fails mid-run (issue 14)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from callbacks.mlflow_logger import MLflowRunLogger
from cli import default_run_name
from tests.run_outputs import cli_args, cli_env, run_cli, start_cli, wait_for_file


def _snapshot(root: Path, client: MlflowClient, run_id: str) -> dict:
    """Every file of the run folder (bytes) and the MLflow run's status, params, tags and artifacts."""
    run = client.get_run(run_id)
    return {
        "files": {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()},
        "status": run.info.status,
        "params": dict(run.data.params),
        "tags": {k: v for k, v in run.data.tags.items()},
        "artifacts": sorted(a.path for a in client.list_artifacts(run_id)),
        "runs": len(client.search_runs([run.info.experiment_id])),
    }


def _refused(args: list[str], cwd: Path) -> str:
    """Run, expect exit 2 with exactly one line on stderr; return that line."""
    done = subprocess.run(args, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=240)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished 2-epoch tiny fit: (folder holding run/ and mlflow.db, tracking URI)."""
    tmp = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_cli(cli_args("fit", tmp, uri, "--trainer.max_epochs", "2"), cwd=tmp)
    return tmp, uri


def test_refused_resumes_leave_the_run_exactly_as_it_was(finished: tuple[Path, str]) -> None:
    tmp, uri = finished
    root, last = tmp / "run", tmp / "run/checkpoints/last.ckpt"
    client = MlflowClient(uri)
    run_id = torch.load(last, weights_only=True)["mlflow"]["run_id"]
    before = _snapshot(root, client, run_id)
    assert before["status"] == "FINISHED"
    # A changed value with a checkpoint *file* (Lightning would silently take the checkpoint's) and with `last`.
    for ckpt in (str(last), "last"):
        line = _refused(cli_args("fit", tmp, uri, "--trainer.max_epochs", "3", "--model.meta_lr", "0.5", "--ckpt_path", ckpt), tmp)
        assert line.startswith("error: ckpt_path:") and "model.meta_lr (checkpoint 0.0003, given 0.5)" in line, line
    # Another policy width: named by the rule before any size-mismatch could happen.
    line = _refused(cli_args("fit", tmp, uri, "--model.policy.init_args.hidden_dim", "32", "--ckpt_path", "last"), tmp)
    assert "model.policy.init_args.hidden_dim (checkpoint 64, given 32)" in line, line
    # Another data setting that the exact resume depends on.
    line = _refused(cli_args("fit", tmp, uri, "--data.rollouts_per_task", "4", "--ckpt_path", "last"), tmp)
    assert "data.rollouts_per_task" in line, line
    # A new fit into the folder without --ckpt_path.
    line = _refused(cli_args("fit", tmp, uri, "--trainer.max_epochs", "3"), tmp)
    assert line.startswith("error: trainer.default_root_dir:") and "--ckpt_path last" in line, line
    assert _snapshot(root, client, run_id) == before


def test_validate_takes_the_architecture_from_the_checkpoint_and_honours_the_command_line(finished: tuple[Path, str]) -> None:
    tmp, uri = finished
    root = tmp / "run"
    fit_files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    done = run_cli(cli_args("validate", tmp, uri, "--model.policy.init_args.hidden_dim", "32", "--model.inner_lr", "0.25",
                            "--ckpt_path", str(root / "checkpoints/last.ckpt")), cwd=tmp)  # fmt: skip
    assert "the policy architecture is the checkpoint's" in done.stderr and "hidden_dim" in done.stderr
    saved = json.loads((root / "validate_results.json").read_text())
    assert saved["config"]["model"]["inner_lr"] == 0.25, "the command line's inner_lr is the one used"
    assert saved["config"]["model"]["policy"]["init_args"]["hidden_dim"] == 64, "the checkpoint's width"
    child = MlflowClient(uri).get_run(saved["mlflow"]["run_id"])
    assert child.data.params["model.inner_lr"] == "0.25" and child.info.status == "FINISHED"
    for path, content in fit_files.items():
        assert path.read_bytes() == content, f"validate changed the fit's {path.name}"


def test_two_live_fits_cannot_share_a_folder(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = start_cli(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "500"), cwd=tmp_path, log=tmp_path / "first.log")
    try:
        wait_for_file(tmp_path / "run/checkpoints/last.ckpt", first)
        while torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["epoch"] < 2:  # atomic writes
            assert first.poll() is None
            time.sleep(0.1)
        # A resume passes the one-run-one-folder check, so only the lock stands in its way.
        line = _refused(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "500", "--ckpt_path", "last"), tmp_path)
        assert "is in use by a running fit" in line and f"pid {first.pid}" in line, line
        assert first.poll() is None, "the first fit goes on"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert "stopped by SIGTERM" in (tmp_path / "first.log").read_text()
    last = tmp_path / "run/checkpoints/last.ckpt"
    epoch = torch.load(last, weights_only=True)["epoch"]
    line = _refused(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", str(epoch - 1), "--ckpt_path", "last"), tmp_path)
    assert line.startswith("error: trainer.max_epochs:"), line
    # The lock died with its process: the resume proceeds.
    run_cli(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", str(epoch + 2), "--ckpt_path", "last"), cwd=tmp_path)
    assert torch.load(last, weights_only=True)["epoch"] == epoch + 1


def test_seeded_runs_get_different_names() -> None:
    config = {"config": ["configs/ml10.yaml"]}
    random.seed(0)
    first = default_run_name(config, "fit")
    random.seed(0)
    second = default_run_name(config, "fit")
    assert first != second and first.startswith("ml10-fit-") and second.startswith("ml10-fit-")


def test_a_failing_tracking_server_does_not_stop_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Metrics are kept while the server fails (one warning), sent in order once it answers, and
    whatever never arrived is reported at the end."""
    logger = MLflowRunLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_name="flaky")
    client = logger.experiment
    real = client.log_batch
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        raise ConnectionError("server went away")

    logger.log_metrics({"train/x": 1.0}, step=0)
    client._client.log_batch = failing
    with pytest.warns(UserWarning, match="MLflow: logging metrics failed"):
        logger.log_metrics({"train/x": 2.0, "epoch": 1}, step=1)
    logger.log_metrics({"train/x": 3.0}, step=2)  # offline: kept without a call
    assert calls["n"] == 1
    client._client.log_batch = real
    logger.retry_interval_s = 0.0
    logger._offline_until = 0.0
    logger.log_metrics({"train/x": 4.0}, step=3)
    history = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "train/x")]
    assert sorted(history) == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0)]
    assert "epoch" not in client.get_run(logger.run_id).data.metrics
    # Down for good: the end of the run says what was not logged, and the run still ends.
    client._client.log_batch = failing
    logger._offline_until = 0.0
    logger.log_metrics({"train/x": 5.0}, step=4)
    logger.finalize("success")
    assert "MLflow: not logged" in capsys.readouterr().err
    assert logger.unlogged() == {"metric updates": 1}
