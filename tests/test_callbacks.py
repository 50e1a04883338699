"""In-process checks of the run callbacks' pieces: atomic checkpoint writes, RNG state, progress-bar
formatting, results.json schema and the curves PNG, stale MLflow run detection."""

from __future__ import annotations

import io
import os
import json
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from callbacks import rng_state
from callbacks.checkpointing import RunCheckpoint
from callbacks.curves import plot_training_curves
from callbacks.mlflow_run import mark_stale_run
from callbacks.progress import format_metrics, human_rate
from callbacks.results import ResultsWriter
from tests.run_outputs import check_plot, validate_results


class _FakeTrainer(SimpleNamespace):
    """Just what RunCheckpoint._save_checkpoint touches; ``save_checkpoint`` may crash half-way."""

    def __init__(self, crash: bool) -> None:
        super().__init__(is_global_zero=True, global_step=7, loggers=[], strategy=SimpleNamespace(barrier=lambda name=None: None))
        self.crash = crash

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        with open(path, "wb") as handle:
            if self.crash:
                handle.write(b"PK\x03\x04 half a zip")
                raise OSError("disk full (simulated)")
            torch.save({"state_dict": {"w": torch.ones(3)}}, handle)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path: Path) -> None:
    callback = RunCheckpoint(dirpath=str(tmp_path))
    target = str(tmp_path / "last.ckpt")
    callback._save_checkpoint(_FakeTrainer(crash=False), target)
    with pytest.raises(OSError, match="simulated"):
        callback._save_checkpoint(_FakeTrainer(crash=True), target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary debris"


def test_rng_state_survives_weights_only_checkpoint() -> None:
    buffer = io.BytesIO()
    torch.save({"rng_states": rng_state.capture_all_ranks(1)}, buffer)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    buffer.seek(0)
    rng_state.restore(torch.load(buffer, weights_only=True)["rng_states"][0])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_progress_bar_format() -> None:
    assert human_rate(16800.0) == "16.8k" and human_rate(424.0) == "424" and human_rate(2.5e6) == "2.5M"
    shown = format_metrics({"v_num": "ab12", "steps_per_s": 16843.2, "post_return": torch.tensor(-41.2345),
                            "post_success": torch.tensor(0.4167), "eval_success": 0.62})
    assert shown == {"env steps/s": "16.8k", "post-adapt return": "-41.23", "post-adapt success": "0.42", "eval success": "0.62"}


def _payload(epochs: int = 6) -> dict:
    train = [
        {"epoch": e, "step": e, "env_steps": 160 * (e + 1), "wall_time_s": 0.5 * (e + 1), "pre_adaptation_return": -10.0 + e,
         "post_adaptation_return": -9.0 + 1.2 * e, "pre_adaptation_success": 0.0, "post_adaptation_success": 0.1 * e,
         "meta_loss": 5.0 / (e + 1), "policy_loss": 0.01, "value_loss": 10.0 / (e + 1), "entropy": 1.9}
        for e in range(epochs)
    ]  # fmt: skip
    evaluation = [
        {"epoch": e, "step": e, "env_steps": 160 * (e + 1), "pre_adaptation_return": -10.0 + e, "post_adaptation_return": -8.0 + e,
         "pre_adaptation_success": 0.0, "post_adaptation_success": 0.2 * e / epochs}
        for e in range(1, epochs, 2)
    ]  # fmt: skip
    return {
        "schema_version": 1, "status": "finished", "config": {"trainer": {}, "model": {}, "data": {"benchmark": "nav2d"}},
        "mlflow": {"run_id": "abc", "tracking_uri": "sqlite:///mlflow.db"}, "epochs_completed": epochs,
        "env_steps": 160 * epochs, "wall_time_s": 3.0, "train": train, "eval": evaluation,
        "protocol": [
            {"epoch": e, "step": e, "env_steps": 160 * (e + 1), "wall_time_s": 0.5 * (e + 1), "success_rate": 0.1 * e,
             "return": 100.0 * e, "success_per_task": {"reach-v3": 0.1 * e},
             "counts": {"protocol": "custom", "num_evals": 2, "adaptation_episodes": 1, "evaluation_episodes": 1,
                        "envs_per_class": 1, "max_episode_steps": 20}}
            for e in (2, 5)
        ],
    }  # fmt: skip


def test_results_schema_and_curves(tmp_path: Path) -> None:
    payload = _payload()
    validate_results(json.loads(json.dumps(payload)))
    broken = _payload()
    del broken["train"][2]["meta_loss"]
    with pytest.raises(AssertionError, match="train\\[2\\]"):
        validate_results(broken)
    path = tmp_path / "training_curves.png"
    plot_training_curves(payload, str(path))
    check_plot(path)
    blank = tmp_path / "blank.png"
    from matplotlib import image

    image.imsave(str(blank), np.ones((300, 600, 3)))
    with pytest.raises(AssertionError):
        check_plot(blank)


def test_stale_run_of_a_dead_process_is_marked_killed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("stale", artifact_location=str(tmp_path / "artifacts"))
    dead_run, live_run = client.create_run(experiment).info.run_id, client.create_run(experiment).info.run_id
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)  # exited and reaped: no such process any more

    def marker(run_id: str, pid: int) -> str:
        path = tmp_path / f"{run_id}.json"
        path.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "pid": pid, "host": socket.gethostname()}))
        return str(path)

    assert mark_stale_run(marker(live_run, os.getpid()), None) is None
    assert mark_stale_run(marker(dead_run, dead_pid), current_run_id=dead_run) is None, "a resume continues its own run"
    assert client.get_run(dead_run).info.status == "RUNNING"
    assert mark_stale_run(marker(dead_run, dead_pid), current_run_id="another") == dead_run
    assert client.get_run(dead_run).info.status == "KILLED"
    assert client.get_run(live_run).info.status == "RUNNING"


def _stand_ins(tmp_path: Path, epoch: int, steps_done: int, env_steps: int) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The trainer and module attributes ``ResultsWriter.record_protocol_evaluation`` reads."""
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), current_epoch=epoch, loggers=[],
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=steps_done)),
    )
    return trainer, SimpleNamespace(env_steps=torch.tensor(env_steps))


def test_protocol_evaluations_go_to_results_and_the_per_task_table(tmp_path: Path) -> None:
    writer = ResultsWriter(plot=False, log_to_mlflow=False)
    writer.set_run_config({"trainer": {}, "model": {}, "data": {"benchmark": "ML10"}})
    trainer, module = _stand_ins(tmp_path, epoch=3, steps_done=4, env_steps=800_000)
    result = {"success_rate": 0.4, "return": 1234.5, "success_per_task": {"door-close-v3": 0.8, "lever-pull-v3": 0.0},
              "counts": {"protocol": "official", "num_evals": None}}
    writer.record_protocol_evaluation(trainer, module, result)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "running"
    assert [(e["epoch"], e["env_steps"], e["success_rate"]) for e in saved["protocol"]] == [(3, 800_000, 0.4)]
    rows = (tmp_path / "eval_per_task.csv").read_text().splitlines()
    assert rows == ["epoch,env_steps,class,success_rate,split", "3,800000,door-close-v3,0.8,test",
                    "3,800000,lever-pull-v3,0.0,test"]
    # The history is checkpoint state: a resumed run continues the same table.
    restored = ResultsWriter(plot=False, log_to_mlflow=False)
    restored.load_state_dict(writer.state_dict())
    assert restored.protocol == writer.protocol


def test_run_summary_names_results_evaluations_and_where_they_are(tmp_path: Path) -> None:
    from callbacks.results import run_summary

    text = run_summary(_payload(), str(tmp_path))
    assert text.splitlines()[0] == "Run finished: 6 epochs, 960 env steps, 0.1 min"
    assert "Meta-World evaluation (custom): last 0.500 at 960 env steps, best 0.500 at 960" in text
    assert "validation (stochastic, after adaptation): success 0.167" in text
    assert str(tmp_path) in text and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text


def test_training_goal_evaluations_stay_apart_from_the_held_out_ones(tmp_path: Path) -> None:
    """split: train results are labelled in the CSV, the summary, the stage file; never the test number."""
    from callbacks.results import run_summary

    payload = _payload()
    train_entry = {**payload["protocol"][-1], "success_rate": 0.9, "success_per_task": {"reach-v3": 0.9}, "counts": {**payload["protocol"][-1]["counts"], "split": "train"}}
    payload["protocol"].append(train_entry)
    text = run_summary(payload, str(tmp_path))
    # The held-out line keeps its own last/best (0.5), the training-goal line has the 0.9.
    assert "Meta-World evaluation (custom): last 0.500 at 960 env steps, best 0.500 at 960" in text
    assert "Meta-World evaluation (custom, training goals): last 0.900 at 960 env steps, best 0.900 at 960" in text

    writer = ResultsWriter(plot=True, log_to_mlflow=False)
    writer.set_run_config({"trainer": {}, "model": {}, "data": {"benchmark": "ML1"}})
    trainer, module = _stand_ins(tmp_path, epoch=0, steps_done=1, env_steps=1000)
    for entry in payload["protocol"][-2:]:
        writer.record_protocol_evaluation(trainer, module, entry)
    rows = (tmp_path / "eval_per_task.csv").read_text().splitlines()
    assert rows[1:] == ["0,1000,reach-v3,0.5,test", "0,1000,reach-v3,0.9,train"]
    assert (tmp_path / "training_curves.png").stat().st_size > 0

    # validate/test: the held-out result under "protocol", the training-goal one under "protocol_train".
    stage_trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), ckpt_path="last.ckpt", callback_metrics={},
        loggers=[], callbacks=[SimpleNamespace(last_result=train_entry), SimpleNamespace(last_result=payload["protocol"][-2])],
    )
    writer._write_stage_results(stage_trainer, "test", "test")
    saved = json.loads((tmp_path / "test_results.json").read_text())
    assert saved["protocol"]["success_rate"] == 0.5 and saved["protocol_train"]["success_rate"] == 0.9
