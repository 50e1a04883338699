"""MLflow round trips: embedded sqlite (fit, then validate/test from its checkpoints), a real
``mlflow server`` over http, and SIGTERM ending a run KILLED with a loadable last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.run_outputs import check_plot, cli_args, cli_env, run_cli, start_cli, validate_results, wait_for_file

EXPECTED_ARTIFACTS = {"config.yaml", "results.json", "training_curves.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"}


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _check_fit_run(client: MlflowClient, run_id: str, epochs: int, tmp_path: Path) -> None:
    """Status, params, metric histories, tags and artifacts of a finished 2-epoch tiny fit."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.benchmark"] == "nav2d" and params["data.meta_batch_size"] == "2"
    assert params["model.policy.class_path"] == "metarl_lightning.policies.SSMActorCritic"
    assert params["trainer.max_epochs"] == str(epochs) and params["checkpoint.monitor"] == "val/post_adaptation_return"
    for key in ("train/post_adaptation_return", "train/meta_loss", "train/env_steps", "train/pre_adaptation_return"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(epochs)), key
    # Each metric once: no `_step`/`_epoch` twins, no Lightning epoch counter, no progress-bar-only values.
    metrics = set(run.data.metrics)
    assert not {k for k in metrics if k.endswith(("_step", "_epoch"))}, sorted(metrics)
    assert not metrics & {"epoch", "post_return", "post_success", "steps_per_s", "eval_success"}, sorted(metrics)
    # Params once, with the dotted config keys, without Lightning internals.
    assert not {k for k in params if "." not in k and not k.startswith("versions")} - {"seed_everything", "ckpt_path", "weights_only"}, sorted(params)
    assert not {k for k in params if k.split(".")[0] in ("optimizer", "lr_scheduler") or "_instantiator" in k}, sorted(params)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert len(client.get_metric_history(run_id, "val/post_adaptation_return")) == epochs // 2
    tags = run.data.tags
    assert tags["benchmark"] == "nav2d" and tags["policy_class"].endswith("SSMActorCritic")
    assert len(tags["git_commit"]) == 40
    assert EXPECTED_ARTIFACTS <= _artifacts(client, run_id)
    local = Path(client.download_artifacts(run_id, "results.json", str(tmp_path)))
    results = json.loads(local.read_text())
    validate_results(results)
    assert results["status"] == "finished" and results["mlflow"]["run_id"] == run_id
    check_plot(Path(client.download_artifacts(run_id, "training_curves.png", str(tmp_path))))
    assert "trainer:" in Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()


def test_sqlite_fit_then_validate_and_test(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cli(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "2"), cwd=tmp_path)
    root = tmp_path / "run"
    assert {p.name for p in root.iterdir()} >= {"config.yaml", "results.json", "training_curves.png", "checkpoints"}
    assert not (root / ".mlflow_active_run.json").exists()
    run_id = torch.load(root / "checkpoints/last.ckpt", weights_only=True)["mlflow"]["run_id"]
    client = MlflowClient(uri)
    _check_fit_run(client, run_id, 2, tmp_path / "download")

    fit_files = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run_cli(cli_args("validate", tmp_path, uri, "--ckpt_path", "best"), cwd=tmp_path)
    run_cli(cli_args("test", tmp_path, uri, "--ckpt_path", str(root / "checkpoints/last.ckpt")), cwd=tmp_path)
    children = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"validate", "test"}
    for stage, prefix in (("validate", "val"), ("test", "test")):
        child = by_stage[stage]
        assert child.info.status == "FINISHED"
        assert f"{prefix}/post_adaptation_return" in child.data.metrics
        assert f"{stage}_results.json" in _artifacts(client, child.info.run_id)
        saved = json.loads((root / f"{stage}_results.json").read_text())
        assert saved["metrics"]["post_adaptation_return"] == pytest.approx(child.data.metrics[f"{prefix}/post_adaptation_return"])
    # Seeded runs still get distinct, readable names (MLflow's generated names follow the seeded RNG).
    names = [client.get_run(run_id).info.run_name] + [by_stage[s].info.run_name for s in ("validate", "test")]
    assert len(set(names)) == 3, names
    assert [n.split("-")[:2] for n in names] == [["nav2d", "fit"], ["nav2d", "validate"], ["nav2d", "test"]], names
    # The fit's own outputs are untouched by validate/test, which write their own config files.
    assert json.loads((root / "results.json").read_text())["status"] == "finished"
    assert (root / "validate_config.yaml").exists() and (root / "test_config.yaml").exists()
    for name in ("config.yaml", "results.json", "training_curves.png", "checkpoints/last.ckpt"):
        assert (root / name).read_bytes() == fit_files[Path(name)], name

    # One run, one folder: a new fit into this folder is refused before it touches anything.
    status_before = client.get_run(run_id).info.status
    refused = subprocess.run(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "3"), cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True, timeout=240)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.default_root_dir:") and "--ckpt_path last" in lines[0], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    for name, content in fit_files.items():
        assert (root / name).read_bytes() == content, name
    assert client.get_run(run_id).info.status == status_before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_remote_mlflow_server(tmp_path: Path) -> None:
    port = _free_port()
    server_log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env=cli_env(), stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        run_cli(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "2"), cwd=tmp_path)
        run_id = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["mlflow"]["run_id"]
        _check_fit_run(MlflowClient(uri), run_id, 2, tmp_path / "download")
        assert not (tmp_path / "mlflow.db").exists(), "nothing may fall back to the embedded store"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server_log.close()


def test_sigterm_ends_run_killed_with_loadable_checkpoint(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    last = tmp_path / "run/checkpoints/last.ckpt"
    process = start_cli(cli_args("fit", tmp_path, uri, "--trainer.max_epochs", "200"), cwd=tmp_path, log=tmp_path / "fit.log")
    try:
        wait_for_file(last, process)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, (tmp_path / "fit.log").read_text()[-3000:]
    # Loadable the way Lightning loads it (weights_only), and resumable: counters and run id are there.
    checkpoint = torch.load(last, weights_only=True)
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "rng_states", "mlflow"} <= set(checkpoint)
    run = MlflowClient(uri).get_run(checkpoint["mlflow"]["run_id"])
    assert run.info.status == "KILLED"
    assert "SIGTERMException" in run.data.tags["metarl.exception"]
    results = json.loads((tmp_path / "run/results.json").read_text())
    validate_results(results)
    assert results["status"] == "killed"
    assert not (tmp_path / "run/.mlflow_active_run.json").exists()
