"""Every Meta-World config runs one short meta-iteration through the real CLI (subprocess).

The budget is overridden to one tiny iteration (1 trajectory of 20 steps per task, in-process
envs); what is exercised is everything else: benchmark construction and splits, env workers,
the policy of the config, the meta-update and the CLI wiring.
"""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest

metaworld_version = version("metaworld")
ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--trainer.max_epochs", "1",
    "--trainer.limit_val_batches", "0",
    "--data.rollouts_per_task", "1",
    "--data.envs_per_task", "1",
    "--data.eval_rollouts_per_task", "1",
    "--data.max_episode_steps", "20",
    "--data.num_env_workers", "1",
    "--model.ppo_epochs", "1",
]
FAST = ["mt1", "ml1", "mt10", "ml10"]
SLOW = ["mt50", "ml45"]


def run_configs(names, tmp_path):
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / f"configs/{name}.yaml"), *TINY,
             "--trainer.default_root_dir", str(tmp_path / name),
             "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / name}.db"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name in names
    }
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name} failed:\n{output[-3000:]}"
        assert "max_epochs=1` reached" in output, f"{name}:\n{output[-2000:]}"


def test_each_benchmark_config_runs_one_meta_iteration(tmp_path):
    run_configs(FAST, tmp_path)
    # The run records what makes Meta-World numbers comparable.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'ml10'}.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["versions.metaworld"] == metaworld_version and params["versions.reward_function"] == "v2"
    assert params["data.benchmark"] == "ML10" and run.data.tags["benchmark"] == "ML10"


@pytest.mark.slow
def test_mt50_and_ml45_configs_run_one_meta_iteration(tmp_path):
    run_configs(SLOW, tmp_path)
