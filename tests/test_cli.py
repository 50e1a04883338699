"""The command line: every shipped config parses, and bad input fails with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.evaluation import MetaWorldEvaluation
from cli import MetaRLCLI
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "nav2d"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_instantiates(config, tmp_path):
    cli = MetaRLCLI(
        MetaRLModule,
        MetaTaskDataModule,
        run=False,
        save_config_callback=None,
        args=["--config", str(config), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)],
    )
    assert isinstance(cli.model, MetaRLModule)
    assert cli.model.policy.observation_dim == cli.datamodule.observation_dim
    assert cli.model.policy.action_dim == cli.datamodule.action_dim
    assert cli.trainer.predicting is False
    assert cli.config["trainer"]["inference_mode"] is False


def test_the_official_protocol_overlay_sets_the_published_counts(tmp_path):
    cli = MetaRLCLI(
        MetaRLModule,
        MetaTaskDataModule,
        run=False,
        save_config_callback=None,
        args=["--config", str(ROOT / "configs/ml10.yaml"), "--config", str(ROOT / "configs/eval/official.yaml"),
              "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)],
    )
    (evaluation,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MetaWorldEvaluation)]
    assert evaluation.counts("ML10", cli.datamodule.max_episode_steps) == {
        "protocol": "official", "num_evals": None, "adaptation_episodes": 10, "evaluation_episodes": 3,
        "envs_per_class": 1, "max_episode_steps": 500,
    }
    assert evaluation.every_n_epochs == 0


BAD_INPUTS = {
    "unknown benchmark": (["--data.benchmark", "ML11"], "data.benchmark", "ML10"),
    "unknown env name": (["--data.benchmark", "ML1", "--data.env_name", "reach-v9"], "data.env_name", "reach-v3"),
    "meta-batch <= 0": (["--data.meta_batch_size", "0"], "data.meta_batch_size", ">= 1"),
    "negative meta lr": (["--model.meta_lr", "-0.1"], "model.meta_lr", "> 0"),
    "negative inner lr": (["--model.inner_lr", "-1"], "model.inner_lr", ">= 0"),
    "negative inner steps": (["--model.inner_steps", "-1"], "model.inner_steps", ">= 0"),
    "envs do not divide": (["--data.rollouts_per_task", "10", "--data.envs_per_task", "3"], "data.envs_per_task", "divide"),
    "missing config file": (["--config", "configs/does-not-exist.yaml"], "does-not-exist.yaml", "does not exist"),
}


def test_bad_input_fails_with_one_line_naming_the_field(tmp_path):
    # One subprocess per case (they must really exit), started together to share the import cost.
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs/nav2d.yaml"), *args, "--trainer.logger", "false"],
            cwd=ROOT if name == "missing config file" else tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _, _) in BAD_INPUTS.items()
    }
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        _, field, allowed = BAD_INPUTS[name]
        error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0, name
        assert len(error_lines) == 1, f"{name}: {stderr}"
        assert field in error_lines[0] and allowed in error_lines[0], f"{name}: {error_lines[0]}"
        assert "Traceback" not in stderr, f"{name}: {stderr}"
