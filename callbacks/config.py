"""Save the resolved config where a run's outputs live, and into the MLflow run.

LightningCLI's stock ``SaveConfigCallback`` writes to ``trainer.log_dir``, which MLFlowLogger with a
sqlite tracking URI does not have (it asserts). This one writes ``config.yaml`` into the trainer's
``default_root_dir`` and, when an MLflow logger is attached, logs the YAML as an artifact and every
leaf of the config as a run parameter (flattened dotted keys), so the MLflow UI shows the whole
experiment.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from metarl_lightning.config_tree import flatten_config

# MLflow rejects parameter values longer than this (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
_MAX_PARAM_LENGTH = 6000
# LightningCLI's own sections that this project does not use (manual optimisation builds its optimiser).
_NOT_PARAMS = ("config", "optimizer", "lr_scheduler")


class SaveConfigToRun(SaveConfigCallback):
    """Writes ``config.yaml`` (``validate_config.yaml`` / ``test_config.yaml`` for those subcommands) to
    ``default_root_dir`` and logs config and params to MLflow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called on global rank 0 only, once per process."""
        text = self.parser.dump(self.config, skip_none=False)
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        # validate/test never overwrite the fit's config.yaml: they write validate_config.yaml / test_config.yaml.
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        name = self.config_filename if stage == "fit" else f"{stage}_{self.config_filename}"
        path = os.path.join(trainer.default_root_dir, name)
        with open(path, "w") as handle:
            handle.write(text)
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                config = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                tree = json.loads(config)
                leaves = flatten_config({k: v for k, v in tree.items() if k not in _NOT_PARAMS})
                params = {k: str(v)[:_MAX_PARAM_LENGTH] for k, v in leaves.items()}
                existing = logger.experiment.get_run(logger.run_id).data.params
                # A resumed run already has its params; MLflow refuses to change a logged value.
                fresh = {k: v for k, v in params.items() if k not in existing}
                logger.log_hyperparams(fresh)
                logger.experiment.log_text(logger.run_id, text, "config.yaml")
