"""Command line: ``python cli.py fit|validate|test --config configs/<benchmark>.yaml [--trainer.* ...]``.

LightningCLI over :class:`MetaRLModule` and :class:`MetaTaskDataModule`. Defaults that meta-RL
needs and Lightning does not: ``inference_mode: false`` (evaluation adapts, which needs gradients)
and MLflow with an embedded sqlite store as the logger. Observation and action sizes flow from the
data module into the policy, so a config only names the policy's architecture.

The run's callbacks are configurable sections of their own: ``checkpoint`` (best/last checkpoints),
``results`` (results.json + training_curves.png), ``mlflow`` (tags, status, checkpoint upload) and
``progress_bar``. ``--ckpt_path last`` (or ``best``, or a path) resumes a fit in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpointing import RunCheckpoint
from callbacks.config import SaveConfigToRun
from callbacks.mlflow_run import CHECKPOINT_KEY, MLflowRunCallback
from callbacks.progress import MetaRLProgressBar
from callbacks.results import ResultsWriter
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_LOGGER = "callbacks.mlflow_logger.MLflowRunLogger"
# Exit status of a process stopped by SIGTERM (128 + 15), as schedulers expect.
_SIGTERM_EXIT = 143


def default_run_name(config: Any, subcommand: str | None) -> str:
    """``<first config file>-<subcommand>-<local time>-<4 hex>``, e.g. ``ml10-fit-20261201-221530-9f3a``.

    MLflow draws its generated names from Python's RNG, which ``seed_everything`` has seeded, so every
    seeded run would be called the same; the suffix comes from ``os.urandom``, which no seed
    touches, so two runs started in the same second differ too. A resumed run keeps its own name.
    """
    configs = config.get("config") or []
    first = configs[0] if isinstance(configs, list) and configs else None
    stem = os.path.splitext(os.path.basename(str(first)))[0] if first is not None else "run"
    return f"{stem}-{subcommand or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def _checkpoint_folder(config: Any) -> str:
    """Where the run's ``last.ckpt`` / ``best.ckpt`` live: ``checkpoint.dirpath`` or ``<root>/checkpoints``."""
    return config.checkpoint.dirpath or os.path.join(config.trainer.default_root_dir, "checkpoints")


def _is_mlflow_logger(class_path: str | None) -> bool:
    return bool(class_path) and class_path.rsplit(".", 1)[-1] in ("MLFlowLogger", "MLflowRunLogger")


class MetaRLCLI(LightningCLI):
    """LightningCLI with the project's defaults, links, run callbacks and MLflow run continuation."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link env shapes into the policy, add the run callbacks, set meta-RL defaults for the trainer."""
        parser.link_arguments("data.observation_dim", "model.policy.init_args.observation_dim", apply_on="instantiate")
        parser.link_arguments("data.action_dim", "model.policy.init_args.action_dim", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ResultsWriter, "results")
        parser.add_lightning_class_args(MLflowRunCallback, "mlflow")
        parser.add_lightning_class_args(MetaRLProgressBar, "progress_bar")
        parser.set_defaults(
            {
                "model.policy": {"class_path": "metarl_lightning.policies.MLPActorCritic"},
                "trainer.inference_mode": False,
                "trainer.default_root_dir": "runs/default",
                "trainer.logger": {
                    "class_path": DEFAULT_LOGGER,
                    "init_args": {"experiment_name": "metarl-lightning", "tracking_uri": DEFAULT_TRACKING_URI},
                },
            }
        )

    # ------------------------------------------------------------------------ resume in MLflow
    def _subcommand_config(self) -> Any:
        # `run=False` (tests, notebooks) parses without a subcommand: the config is top-level.
        return self.config[self.subcommand] if self.subcommand else self.config

    def _resolve_ckpt_path(self, config: Any) -> str | None:
        """``last``/``best`` -> the file in the run's checkpoint folder (when it exists), else as given."""
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            folder = _checkpoint_folder(config)
            candidate = os.path.join(folder, f"{ckpt_path}.ckpt")
            if os.path.isfile(candidate):
                config.ckpt_path = candidate
                return candidate
            return None  # Lightning reports a missing last/best checkpoint its own way
        return ckpt_path

    @staticmethod
    def _mlflow_logger_args(config: Any) -> Any:
        """The ``init_args`` of the configured MLflow logger, or ``None`` for another logger."""
        logger = config.trainer.get("logger")
        if logger is None or isinstance(logger, (bool, list)):
            return None
        return logger.init_args if _is_mlflow_logger(logger.get("class_path")) else None

    def before_instantiate_classes(self) -> None:
        """Read the MLflow run from the checkpoint before the logger exists.

        ``fit``: continue that run (``run_id``) when the configured tracking store has it.
        ``validate``/``test``: a new run, nested under the training run in the MLflow UI.
        """
        config = self._subcommand_config()
        ckpt_path = self._resolve_ckpt_path(config)
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            self._refuse_foreign_checkpoints(config)
        logger_args = self._mlflow_logger_args(config)
        if logger_args is not None and not logger_args.get("run_name"):
            # A seeded run would get the same generated name from MLflow's RNG every time.
            logger_args.run_name = default_run_name(config, self.subcommand)
        if not ckpt_path or logger_args is None or not os.path.isfile(ckpt_path):
            return
        import torch

        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        saved = checkpoint.get(CHECKPOINT_KEY) or {}
        run_id = saved.get("run_id")
        if not run_id:
            return
        if self.subcommand == "fit":
            if logger_args.get("run_id"):
                return  # the user chose a run explicitly
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            try:
                MlflowClient(logger_args.tracking_uri).get_run(run_id)
            except MlflowException:
                warnings.warn(f"MLflow run {run_id} of {ckpt_path} is not in {logger_args.tracking_uri}: resuming into a new run")
                return
            logger_args.run_id = run_id
        else:
            tags = dict(logger_args.get("tags") or {})
            tags.setdefault("mlflow.parentRunId", run_id)
            tags.setdefault("source_checkpoint", os.path.abspath(ckpt_path))
            logger_args.tags = tags

    @staticmethod
    def _refuse_foreign_checkpoints(config: Any) -> None:
        """One run, one folder: a new fit does not write into a folder that holds a run's checkpoints.

        Checked before anything is created, so the earlier run's files and MLflow run stay as they were.
        """
        folder = _checkpoint_folder(config)
        found = sorted(name for name in ("last.ckpt", "best.ckpt") if os.path.isfile(os.path.join(folder, name)))
        if found:
            raise ConfigError(
                f"trainer.default_root_dir: {config.trainer.default_root_dir} already holds a run ({', '.join(found)}); "
                "resume it with --ckpt_path last, or give this run its own --trainer.default_root_dir"
            )

    def after_instantiate_classes(self) -> None:
        """Give the results writer the resolved config to embed in ``results.json``."""
        parser = self._parser(self.subcommand)
        config = json.loads(parser.dump(self._subcommand_config(), format="json", skip_none=False))
        config.pop("config", None)
        for callback in self.trainer.callbacks:
            if isinstance(callback, ResultsWriter):
                callback.set_run_config(config)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python cli.py`` and the ``metarl-lightning`` console script."""
    try:
        MetaRLCLI(
            MetaRLModule,
            MetaTaskDataModule,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except ConfigError as error:
        # Bad configuration is the user's to fix: one line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        # Lightning turns SIGTERM into a SystemExit with status 0; a stopped job is not a success.
        sys.exit(_SIGTERM_EXIT)


if __name__ == "__main__":
    main()
