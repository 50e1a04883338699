"""Command line: ``python cli.py fit|validate|test --config configs/<benchmark>.yaml [--trainer.* ...]``.

LightningCLI over :class:`MetaRLModule` and :class:`MetaTaskDataModule`. Defaults that meta-RL
needs and Lightning does not: ``inference_mode: false`` (evaluation adapts, which needs gradients)
and MLflow with an embedded sqlite store as the logger. Observation and action sizes flow from the
data module into the policy, so a config only names the policy's architecture.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.config import SaveConfigToRun
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError
from metarl_lightning.module import MetaRLModule

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class MetaRLCLI(LightningCLI):
    """LightningCLI with the project's defaults and links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link env shapes into the policy and set meta-RL defaults for the trainer."""
        parser.link_arguments("data.observation_dim", "model.policy.init_args.observation_dim", apply_on="instantiate")
        parser.link_arguments("data.action_dim", "model.policy.init_args.action_dim", apply_on="instantiate")
        parser.set_defaults(
            {
                "model.policy": {"class_path": "metarl_lightning.policies.MLPActorCritic"},
                "trainer.inference_mode": False,
                "trainer.default_root_dir": "runs/default",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                    "init_args": {"experiment_name": "metarl-lightning", "tracking_uri": DEFAULT_TRACKING_URI},
                },
            }
        )


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


if __name__ == "__main__":
    main()
