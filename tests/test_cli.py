"""The command line: every shipped config parses, and bad input fails with one clear line."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from callbacks.evaluation import MetaWorldEvaluation
from cli import MetaRLCLI
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "nav2d"} <= names


def _parsed_cli(configs: list[Path], tmp_path) -> MetaRLCLI:
    """The CLI of ``configs`` (applied in order), instantiated but not run, without a logger."""
    args = [arg for config in configs for arg in ("--config", str(config))]
    return MetaRLCLI(
        MetaRLModule,
        MetaTaskDataModule,
        run=False,
        save_config_callback=None,
        args=[*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)],
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_instantiates(config, tmp_path):
    cli = _parsed_cli([config], tmp_path)
    assert isinstance(cli.model, MetaRLModule)
    assert cli.model.policy.observation_dim == cli.datamodule.observation_dim
    assert cli.model.policy.action_dim == cli.datamodule.action_dim
    assert cli.trainer.predicting is False
    assert cli.config["trainer"]["inference_mode"] is False


def _evaluation_with_overlay(config: str, overlay: str, tmp_path) -> tuple[MetaWorldEvaluation, int | None]:
    """The one MetaWorldEvaluation callback of ``configs/<config>`` under ``configs/eval/<overlay>``,
    and the data module's episode length."""
    cli = _parsed_cli([ROOT / "configs" / config, ROOT / "configs/eval" / overlay], tmp_path)
    (evaluation,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MetaWorldEvaluation)]
    return evaluation, cli.datamodule.max_episode_steps


@pytest.mark.parametrize(
    ("overlay", "every_n_epochs", "extra"),
    [
        ("official.yaml", 0, {}),
        ("official_in_fit.yaml", 10, {}),
        ("official_at_end.yaml", 0, {}),
        ("official_adapted_state.yaml", 0, {"eval_state": "adapted"}),
        ("official_train_goals.yaml", 0, {"split": "train"}),
    ],
)
def test_the_official_protocol_overlays_set_the_published_counts(overlay, every_n_epochs, extra, tmp_path):
    evaluation, episode_steps = _evaluation_with_overlay("ml10.yaml", overlay, tmp_path)
    assert evaluation.at_fit_end is (overlay == "official_at_end.yaml")
    assert evaluation.counts("ML10", episode_steps) == {
        "protocol": "official", "num_evals": None, "adaptation_episodes": 10, "evaluation_episodes": 3,
        "envs_per_class": 1, "max_episode_steps": 500, **extra,
    }
    assert evaluation.every_n_epochs == every_n_epochs


@pytest.mark.parametrize(
    ("config", "benchmark", "overlay", "counts"),
    [
        ("ml1.yaml", "ML1", "reference_layout.yaml", {"num_evals": 5, "envs_per_class": 10}),
        # 4 envs per class and 10 rounds: meta-batch 20 over 5 test classes, 5 x 40 goals / 20.
        ("ml10_rl2.yaml", "ML10", "reference_layout_ml10.yaml", {"num_evals": 10, "envs_per_class": 4, "eval_state": "adapted"}),
    ],
)
def test_the_reference_layout_overlays_set_the_reference_codes_counts(config, benchmark, overlay, counts, tmp_path):
    evaluation, episode_steps = _evaluation_with_overlay(config, overlay, tmp_path)
    assert evaluation.counts(benchmark, episode_steps) == {
        "protocol": "custom", "adaptation_episodes": 10, "evaluation_episodes": 3, "max_episode_steps": 500, **counts,
    }
    assert evaluation.every_n_epochs == 0


NAV2D = ["--config", str(ROOT / "configs/nav2d.yaml")]

# name -> (arguments after `fit`, field named in the error, what the error says is allowed / wrong).
BAD_INPUTS = {
    "unknown benchmark": ([*NAV2D, "--data.benchmark", "ML11"], "data.benchmark", "ML10"),
    "unknown env name": ([*NAV2D, "--data.benchmark", "ML1", "--data.env_name", "reach-v9"], "data.env_name", "reach-v3"),
    "env name for MT10": ([*NAV2D, "--data.benchmark", "MT10", "--data.env_name", "reach-v3", "--data.meta_batch_size", "10"], "data.env_name", "MT1 and ML1"),
    "ML10 meta-batch not a multiple": ([*NAV2D, "--data.benchmark", "ML10", "--data.meta_batch_size", "4"], "data.meta_batch_size", "multiple of the 10"),
    "meta-batch <= 0": ([*NAV2D, "--data.meta_batch_size", "0"], "data.meta_batch_size", ">= 1"),
    "negative meta lr": ([*NAV2D, "--model.meta_lr", "-0.1"], "model.meta_lr", "> 0"),
    "meta lr not a number": ([*NAV2D, "--model.meta_lr", "abc"], "model.meta_lr", "float"),
    "unknown key": ([*NAV2D, "--model.bogus", "1"], "--model.bogus", "unrecognized"),
    "negative inner lr": ([*NAV2D, "--model.inner_lr", "-1"], "model.inner_lr", ">= 0"),
    "negative inner steps": ([*NAV2D, "--model.inner_steps", "-1"], "model.inner_steps", ">= 0"),
    "envs do not divide": ([*NAV2D, "--data.rollouts_per_task", "10", "--data.envs_per_task", "3"], "data.envs_per_task", "divide"),
    "carried query state without a query": ([*NAV2D, "--data.reset_state_on", "trial", "--data.query_state", "carry", "--model.inner_steps", "0"],
                                            "data.query_state", "inner_steps >= 1"),
    "env minibatches do not divide": ([*NAV2D, "--data.rollouts_per_task", "4", "--data.envs_per_task", "4", "--model.outer_env_minibatches", "3"], "model.outer_env_minibatches", "divisor of 4"),
    "width 0": ([*NAV2D, "--model.policy.init_args.hidden_dim", "0"], "model.policy.init_args.hidden_dim", ">= 1"),
    "negative SSM width": ([*NAV2D, "--model.policy.init_args.state_dim", "-4"], "model.policy.init_args.state_dim", ">= 1"),
    "max_epochs -5": ([*NAV2D, "--trainer.max_epochs", "-5"], "trainer.max_epochs", ">= 0"),
    "lr annealed over no epoch count": ([*NAV2D, "--model.meta_lr_final", "0", "--trainer.max_epochs", "-1"], "trainer.max_epochs", "meta_lr_final"),
    "negative success bonus": ([*NAV2D, "--model.success_bonus", "-1"], "model.success_bonus", ">= 0"),
    "exploration term without a support rollout": ([*NAV2D, "--model.exploration_coef", "1", "--model.inner_steps", "0"],
                                                   "model.exploration_coef", "inner_steps > 0"),
    "final lr above the start": ([*NAV2D, "--model.meta_lr_final", "0.1"], "model.meta_lr_final", "[0, model.meta_lr"),
    "validation every 0 epochs": ([*NAV2D, "--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch", ">= 1"),
    "episodes of 1e9 steps": ([*NAV2D, "--data.max_episode_steps", "1000000000"], "data", "is available"),
    "1000 eval tasks on ML1": (["--config", str(ROOT / "configs/ml1.yaml"), "--data.num_eval_tasks", "1000"], "data", "evaluation envs"),
    "missing config file": (["--config", "configs/does-not-exist.yaml"], "does-not-exist.yaml", "does not exist"),
    "YAML syntax error": (["--config", "{broken}"], "Problems parsing config", "line 3"),
    "unknown key in YAML": (["--config", "{unknown}"], "not_a_key", "not_a_key"),
    "missing checkpoint": ([*NAV2D, "--ckpt_path", "{missing}"], "ckpt_path", "does not exist"),
    "truncated checkpoint": ([*NAV2D, "--ckpt_path", "{truncated}"], "ckpt_path", "not a readable checkpoint"),
    "foreign checkpoint": ([*NAV2D, "--ckpt_path", "{foreign}"], "ckpt_path", "not a metarl-lightning checkpoint"),
    "root dir is a file": ([*NAV2D, "--trainer.default_root_dir", "{a_file}"], "trainer.default_root_dir", "not a directory"),
    "sqlite in a missing folder": ([*NAV2D, "--trainer.logger.init_args.tracking_uri", "sqlite:///no/such/folder/m.db"], "tracking_uri", "does not exist"),
    "unreachable tracking server": ([*NAV2D, "--trainer.logger.init_args.tracking_uri", "http://127.0.0.1:{port}"], "tracking_uri", "cannot reach"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["GPU on a CPU machine"] = ([*NAV2D, "--trainer.accelerator", "gpu"], "trainer", "gpu")


def _bad_files(tmp_path: Path) -> dict[str, str]:
    """The files the bad inputs name: broken YAML, a config with an unknown key, bad checkpoints."""
    (tmp_path / "broken.yaml").write_text("model:\n  meta_lr: 0.1\n   inner_lr: [\n")
    (tmp_path / "unknown.yaml").write_text("model:\n  not_a_key: 1\n")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "foreign.ckpt")
    (tmp_path / "a_file").write_text("not a folder")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    names = {name: str(tmp_path / f"{name}.yaml") for name in ("broken", "unknown")}
    names.update({name: str(tmp_path / f"{name}.ckpt") for name in ("missing", "truncated", "foreign")})
    return {**names, "a_file": str(tmp_path / "a_file"), "port": str(port)}


def test_bad_input_fails_with_one_line_naming_the_field(tmp_path):
    """Each bad input: exit 2, exactly one line on stderr (no usage dump, no traceback), nothing written."""
    files = _bad_files(tmp_path)
    root = tmp_path / "run"
    base = ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cases = list(BAD_INPUTS.items())
    for start in range(0, len(cases), 6):  # a few at a time: each process imports torch and Lightning
        procs = {}
        for name, (args, _, _) in cases[start : start + 6]:
            args = [a.format(**files) for a in args]
            procs[name] = subprocess.Popen(
                [sys.executable, str(ROOT / "cli.py"), "fit", *base, *args],
                cwd=ROOT if name == "missing config file" else tmp_path,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
        for name, proc in procs.items():
            _, stderr = proc.communicate(timeout=300)
            _, field, allowed = BAD_INPUTS[name]
            lines = stderr.splitlines()
            assert proc.returncode == 2, f"{name}: exit {proc.returncode}: {stderr[-2000:]}"
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {stderr[-3000:]}"
            assert field in lines[0] and allowed in lines[0], f"{name}: {lines[0]}"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists(), "a refused start created an MLflow store"
    assert not root.exists() or not any(root.iterdir()), f"a refused start wrote {sorted(root.rglob('*'))}"


def test_errors_are_printed_by_the_primary_process_only(tmp_path):
    """Under DDP every rank fails on the same bad value; only rank 0 prints it (no interleaved lines)."""
    env = {**os.environ, "LOCAL_RANK": "1", "NODE_RANK": "0"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", *NAV2D, "--model.meta_lr", "-1", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr == "", done.stderr[-2000:]


# The original runner's README commands (sunghunkwag/MetaRL-Agent-Emergence: RESULTS.md "Test
# Configuration" and "Full MT10 Experiment", README "Quick Test Run"), translated with the README's
# flag table; MT10 meta-batches of 4 and 2 walk through the 10 classes.
SEED_COMMANDS = {
    "quick start": ["--data.benchmark", "MT10", "--trainer.max_epochs", "100", "--data.meta_batch_size", "4",
                    "--data.rollouts_per_task", "10", "--model.policy.init_args.hidden_dim", "128", "--model.meta_lr", "0.001",
                    "--model.inner_lr", "0.01", "--trainer.check_val_every_n_epoch", "10", "--trainer.default_root_dir", "results"],
    "quick test run": ["--data.benchmark", "MT10", "--trainer.max_epochs", "10", "--data.meta_batch_size", "2",
                       "--data.rollouts_per_task", "5", "--trainer.check_val_every_n_epoch", "5", "--trainer.default_root_dir", "results/test"],
    "full MT10 experiment": ["--data.benchmark", "MT10", "--trainer.max_epochs", "100", "--data.meta_batch_size", "4",
                             "--data.rollouts_per_task", "10", "--trainer.default_root_dir", "results/mt10_full"],
}  # fmt: skip


def test_the_seed_readme_commands_run_as_written(tmp_path):
    """Each command as the flag table translates it, with a tiny budget appended (2 epochs of 10-step
    episodes; the quick test run 5 epochs, so its validation at epoch 5 runs): exit 0, run outputs
    written, the env steps of the meta-batch size asked for."""
    budgets = {"quick start": 2, "quick test run": 5, "full MT10 experiment": 2}
    procs = {}
    for name, args in SEED_COMMANDS.items():
        budget = ["--trainer.max_epochs", str(budgets[name]), "--data.max_episode_steps", "10",
                  "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / name.replace(' ', '_')}.db"]  # fmt: skip
        cwd = tmp_path / name.replace(" ", "_")  # one store each: concurrent first creations of one sqlite store race
        cwd.mkdir()
        procs[name] = (cwd, subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "fit", *args, *budget], cwd=cwd,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for name, (cwd, proc) in procs.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        args = SEED_COMMANDS[name]
        root = cwd / args[args.index("--trainer.default_root_dir") + 1]
        results = json.loads((root / "results.json").read_text())
        batch, rollouts = (int(args[args.index(flag) + 1]) for flag in ("--data.meta_batch_size", "--data.rollouts_per_task"))
        assert results["env_steps"] == budgets[name] * batch * rollouts * 10 * 2, (name, results["env_steps"])
        assert (root / "checkpoints" / "last.ckpt").exists()
