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
import logging
import os
import sys
import time
import warnings
from typing import Any

from metarl_lightning.envs.process_start import prestart_fork_server

if __name__ == "__main__" and sys.argv[1:2] in (["fit"], ["validate"], ["test"]):
    # Before torch and Lightning import (~5 s): the env workers' fork server imports metaworld and
    # MuJoCo on the other core meanwhile (docs/benchmarks.md, "Start-up").
    prestart_fork_server()

from jsonargparse import Namespace  # noqa: E402 - after the fork server's start, on purpose
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpointing import RunCheckpoint
from callbacks.config import SaveConfigToRun
from callbacks.mlflow_run import CHECKPOINT_KEY, MLflowRunCallback
from callbacks.progress import MetaRLProgressBar
from callbacks.results import ResultsWriter
from metarl_lightning.checks import checkpoint as ckpt_rule
from metarl_lightning.checks.config import check_benchmark, check_lr_schedule, check_model, check_policy, check_trainer
from metarl_lightning.checks.resources import METAWORLD_ENV_BYTES, available_memory_bytes, check_memory, check_writable_dir, estimate_memory
from metarl_lightning.checks.run_lock import acquire_run_lock, is_primary_process
from metarl_lightning.checks.tracking import check_tracking_uri
from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.errors import ConfigError, require
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


class HeldLogs:
    """Hold Lightning's info lines ("Seed set to 0", "GPU available: ...") until the pre-flight checks pass.

    A refused start then prints its one error line and nothing else; a start that passes prints the
    held lines, in order, as if they had never been held.
    """

    _NAMES = ("lightning.pytorch", "lightning.fabric")

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        holder = self

        class _Hold(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                holder.records.append(record)

        self._handler = _Hold()

    def hold(self) -> None:
        """Route the Lightning loggers' records into this buffer."""
        if self._saved:
            return
        for name in self._NAMES:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers, logger.propagate = [self._handler], False

    def release(self, replay: bool = True) -> None:
        """Give the loggers their handlers back and (``replay``) emit the held records through them."""
        for logger, handlers, propagate in self._saved:
            logger.handlers, logger.propagate = handlers, propagate
        self._saved = []
        records, self.records = self.records, []
        if replay:
            for record in records:
                logging.getLogger(record.name).handle(record)


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's errors as one ``error: ...`` line, without the ~100-line usage dump.

    ``--help`` still prints everything; only the error path changes.
    """

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)  # raises, for the parent parser (or a debugging user) to handle
        line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
        if len(line) > 600:
            line = line[:600] + " ..."
        if is_primary_process():
            sys.stderr.write(f"error: {line} (see --help)\n")
        self.exit(2)


class MetaRLCLI(LightningCLI):
    """LightningCLI with the project's defaults, links, run callbacks, pre-flight checks and MLflow
    run continuation.

    Every check that can fail runs before any file or MLflow run is created or changed: config values
    and the checkpoint in :meth:`before_instantiate_classes`, then the checkpoint against the built
    model, the memory bound and the folder lock in :meth:`_preflight` (called just before the
    subcommand runs).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", OneLineErrorParser)
        self._checkpoint: dict[str, Any] | None = None
        self._held_logs = HeldLogs()
        self._held_logs.hold()
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._held_logs.release(replay=False)  # a refused start prints its error line alone
            raise
        self._held_logs.release()  # `run=False`: nothing ran the pre-flight

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
                # Lightning's sanity check is a whole evaluation here (27 s on ML10) before the first step.
                "trainer.num_sanity_val_steps": 0,
                "trainer.default_root_dir": "runs/default",
                "trainer.logger": {
                    "class_path": DEFAULT_LOGGER,
                    "init_args": {"experiment_name": "metarl-lightning", "tracking_uri": DEFAULT_TRACKING_URI},
                },
            }
        )

    def _parse_ckpt_path(self) -> None:
        """Lightning's version overwrites the parsed config with a checkpoint *file*'s hyperparameters
        (not with ``last``/``best``), silently dropping command-line values. Here the checkpoint rule
        (:mod:`metarl_lightning.checks.checkpoint`, applied in :meth:`before_instantiate_classes`)
        decides instead: resume-critical values must match, everything else is the command line's.
        """

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
        """Check the config and the checkpoint, then read the MLflow run from it before the logger exists.

        ``fit``: continue that run (``run_id``) when the configured tracking store has it.
        ``validate``/``test``: a new run, nested under the training run in the MLflow UI.
        """
        config = self._subcommand_config()
        requested = config.get("ckpt_path")
        ckpt_path = self._resolve_ckpt_path(config)
        self._check_config(config)
        if self.subcommand == "fit" and not requested:
            self._refuse_foreign_checkpoints(config)
        if requested in ("last", "best") and ckpt_path is None:
            # fit: Lightning starts from scratch when there is no last checkpoint yet (a first start).
            require(self.subcommand == "fit", "ckpt_path", f"{requested}: there is no {requested}.ckpt in {_checkpoint_folder(config)}")
        elif ckpt_path:
            self._apply_checkpoint_rule(config, ckpt_path)
        logger_args = self._mlflow_logger_args(config)
        if logger_args is not None:
            check_tracking_uri(logger_args.get("tracking_uri"))
        if logger_args is not None and not logger_args.get("run_name"):
            # A seeded run would get the same generated name from MLflow's RNG every time.
            logger_args.run_name = default_run_name(config, self.subcommand)
        if self._checkpoint is None or logger_args is None:
            return
        saved = self._checkpoint.get(CHECKPOINT_KEY) or {}
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

    def _check_config(self, config: Any) -> None:
        """Values that would fail late (mid-run, or after output files exist), and the output folders."""
        check_trainer(config.trainer)
        check_policy(config.model.get("policy") or {})
        check_model(config.model, config.data)
        check_lr_schedule(config.model, config.trainer)
        check_benchmark(config.data, fit=self.subcommand in (None, "fit"))
        if self.subcommand:  # a run writes; `run=False` (tests, notebooks) only builds
            check_writable_dir(config.trainer.default_root_dir, "trainer.default_root_dir")
            if config.checkpoint.get("dirpath"):
                check_writable_dir(config.checkpoint.dirpath, "checkpoint.dirpath")

    def _apply_checkpoint_rule(self, config: Any, ckpt_path: str) -> None:
        """Load the checkpoint and apply the checkpoint-vs-command-line rule (metarl_lightning/checks/checkpoint.py)."""
        self._checkpoint = checkpoint = ckpt_rule.load_checkpoint(ckpt_path)
        if self.subcommand == "fit":
            ckpt_rule.check_resume(
                ckpt_path,
                checkpoint,
                config.model.as_dict(),
                config.data.as_dict(),
                model_defaults=ckpt_rule.init_defaults(self.model_class),
                data_defaults=ckpt_rule.init_defaults(self.datamodule_class),
            )
            ckpt_rule.check_epochs(ckpt_path, checkpoint, config.trainer.get("max_epochs"))
            return
        # validate / test: the architecture is the checkpoint's.
        saved = checkpoint.get(ckpt_rule.POLICY_CONFIG_KEY)
        if saved is not None:
            policy = config.model.policy
            given = ckpt_rule.policy_config(policy.as_dict())
            if given != saved:
                linked = {k: v for k, v in (policy.get("init_args") or Namespace()).as_dict().items() if k in ckpt_rule.LINKED_POLICY_ARGS}
                config.model.policy = Namespace(class_path=saved["class_path"], init_args=Namespace(**saved["init_args"], **linked))
                changed = ckpt_rule.differences(given["init_args"], saved["init_args"], "model.policy.init_args") if given["class_path"] == saved["class_path"] else [f"model.policy.class_path {saved['class_path']}"]
                if is_primary_process():
                    print(f"note: the policy architecture is the checkpoint's ({'; '.join(changed)})", file=sys.stderr)
        hparams = checkpoint["hyper_parameters"]
        if hparams.get("learn_inner_lr"):  # learned step sizes are parameters of the checkpoint
            config.model.learn_inner_lr = True
            config.model.inner_parameters = hparams.get("inner_parameters", "all")

    def _preflight(self) -> None:
        """After the classes exist, before the subcommand touches anything: checkpoint fit, memory, lock."""
        config = self._subcommand_config()
        if self._checkpoint is not None:
            ckpt_rule.check_state_dict(config.ckpt_path, self._checkpoint["state_dict"], self.model.state_dict())
        dm, world = self.datamodule, self.trainer.world_size
        fit = self.subcommand == "fit"
        dm.check_world_size(world, fit)
        metaworld = dm.benchmark != "nav2d"
        estimate = estimate_memory(
            train_agents=dm.meta_batch_size // world,
            eval_agents=dm.num_eval_tasks // world,
            envs_per_task=dm.envs_per_task,
            train_steps=dm.rollout_steps,
            eval_steps=dm.eval_rollout_steps,
            observation_dim=dm.observation_dim,
            action_dim=dm.action_dim,
            env_bytes=METAWORLD_ENV_BYTES if metaworld else 0,
            fit=fit,
        )
        # Ranks of one machine share its memory.
        local_ranks = max(1, world // max(1, int(getattr(self.trainer, "num_nodes", 1) or 1)))
        available = available_memory_bytes()
        check_memory(estimate, None if available is None else available // local_ranks)
        if fit and is_primary_process():
            acquire_run_lock(self.trainer.default_root_dir)
        self._held_logs.release()

    def before_fit(self) -> None:
        """Pre-flight checks of ``fit``; then the training envs start building (one process only)."""
        self._preflight()
        if self.trainer.world_size == 1 and self.datamodule is not None:
            # While the workers build, Lightning starts the MLflow run and sets up (~1-2 s).
            self.datamodule.prestart()

    def before_validate(self) -> None:
        """Pre-flight checks of ``validate``."""
        self._preflight()

    def before_test(self) -> None:
        """Pre-flight checks of ``test``."""
        self._preflight()

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
        """Give the results writer the resolved config, the checkpoints the policy's config.

        Lightning's own hyperparameter logging is off: it would add every init argument a second time
        under flat names, with its internals (``_instantiator``); the config callback logs the dotted
        config keys once.
        """
        parser = self._parser(self.subcommand)
        config = json.loads(parser.dump(self._subcommand_config(), format="json", skip_none=False))
        config.pop("config", None)
        policy = ckpt_rule.policy_config(config["model"]["policy"])
        for callback in self.trainer.callbacks:
            if isinstance(callback, ResultsWriter):
                callback.set_run_config(config)
            if isinstance(callback, RunCheckpoint):
                callback.policy_config = policy
        self.model._log_hyperparams = False
        if self.datamodule is not None:
            self.datamodule._log_hyperparams = False


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
        # Bad configuration is the user's to fix: one line, no traceback, once (not per DDP rank).
        _print_once(f"error: {error}")
        sys.exit(2)
    except MisconfigurationException as error:
        # Lightning's own refusals (an accelerator this machine lacks, ...): also the user's to fix.
        message = " ".join(str(error).split())
        _print_once(f"error: trainer: {message}")
        sys.exit(2)
    except SIGTERMException:
        # Lightning turns SIGTERM into a SystemExit with status 0; a stopped job is not a success.
        _print_once("stopped by SIGTERM: the last checkpoint is kept; resume with --ckpt_path last")
        sys.exit(_SIGTERM_EXIT)


def _print_once(line: str) -> None:
    """Print on the primary process only: DDP ranks fail together and would repeat (and interleave) it."""
    if is_primary_process():
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
