"""The in-context configs run one short meta-iteration through the real CLI (subprocess, one at a time).

As ``test_benchmark_configs.py``, with trials kept: two 10-step episodes per trial and env, so the
trial memory, the context inputs and (for MAML + memory) the inner step on a trial are exercised.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.module import MetaRLModule

ROOT = Path(__file__).resolve().parents[1]
TINY_TRIALS = [
    "--trainer.max_epochs", "1",
    "--trainer.limit_val_batches", "0",
    "--data.rollouts_per_task", "4",
    "--data.envs_per_task", "2",  # the RL^2 configs take PPO minibatches of 1 of 2 trials
    "--data.eval_rollouts_per_task", "4",
    "--data.episodes_per_trial", "2",
    "--data.max_episode_steps", "10",
    "--data.num_env_workers", "1",
    "--model.ppo_epochs", "1",
]
CONFIGS = ["ml1_rl2", "ml1_rl2_gru", "ml10_rl2", "ml10_rl2_gru", "ml10_maml_memory"]
# ml10_rl2 differs from ml1_rl2 only in the benchmark, the _gru configs from theirs only in the policy.
RUNS = ["ml1_rl2", "ml10_maml_memory", *(pytest.param(n, marks=pytest.mark.slow) for n in ("ml10_rl2", "ml10_rl2_gru"))]


@pytest.mark.parametrize("name", CONFIGS)
def test_in_context_config_builds_an_in_context_learner(name):
    """The config's data module and model, instantiated as the CLI would (sizes linked from the data)."""
    config = yaml.safe_load((ROOT / f"configs/{name}.yaml").read_text())
    data = MetaTaskDataModule(**config["data"])
    assert data.context_inputs and data.reset_state_on == "trial" and data.episodes_per_trial
    assert data.observation_dim == 39 + 6
    model = dict(config["model"])
    spec = model.pop("policy")
    module_name, class_name = spec["class_path"].rsplit(".", 1)
    policy_class = getattr(importlib.import_module(module_name), class_name)
    policy = policy_class(data.observation_dim, data.action_dim, **spec["init_args"])
    module = MetaRLModule(policy, **model)
    assert (module.hparams.inner_steps == 0) == name.startswith(("ml1_rl2", "ml10_rl2"))
    # Support and query trials are whole trials: 10 (RL^2) or 5 (MAML + memory) 500-step episodes.
    assert data.rollout_steps == data.episodes_per_trial * 500


@pytest.mark.parametrize("name", RUNS)
def test_in_context_config_runs_one_meta_iteration(name, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / f"configs/{name}.yaml"), *TINY_TRIALS,
         "--trainer.default_root_dir", str(tmp_path / name),
         "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path / name}.db"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}"
    assert "max_epochs=1` reached" in proc.stdout, f"{name}:\n{proc.stdout[-2000:]}"
