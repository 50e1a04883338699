"""Meta-World's official evaluation protocol as a Lightning callback.

Runs ``metarl_lightning.evaluation`` (``metaworld.evaluation`` unchanged, through our adapter) every
``every_n_epochs`` training epochs (and after the last one with ``at_fit_end``) and, for the
``validate`` / ``test`` subcommands, once at the end of their epoch. Logs ``eval/success_rate``,
``eval/return`` and ``eval/success/<task>`` (``eval_train/...`` for ``split: train``: the protocol on
the training classes and goals).

Distributed: the evaluation runs on rank 0 only (its cost does not shrink with more ranks, and the
protocol is one sequential loop); the result is then broadcast and *every* rank logs the same
values. Every rank reaches the hook and the broadcast, so nothing deadlocks, and the metrics exist
on all ranks, so ``eval/success_rate`` can be a ``ModelCheckpoint`` monitor under DDP too.

The hooks are the ``*_epoch_end`` ones (not ``on_validation_end`` / ``on_test_end``): Lightning only
allows ``LightningModule.log`` in those. Validation may run under ``inference_mode``, which would
forbid the inner update: the evaluation steps out of it explicitly.

2-D navigation is not a Meta-World benchmark: the callback then does nothing (logged once).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from metarl_lightning.protocol_split import metric_prefix
from callbacks.results import ResultsWriter
from metarl_lightning.evaluation import evaluate_meta_learning, evaluate_multi_task

log = logging.getLogger(__name__)


class MetaWorldEvaluation(Callback):
    """Official Meta-World evaluation (ML: adapt then evaluate on test goals; MT: evaluate theta).

    The benchmark, its ``env_name``, seed, episode length, fast-env and one-hot settings come from
    the trainer's data module, so evaluation sees exactly the benchmark training used.

    ``protocol: official`` runs the counts published numbers use and ignores the count arguments:
    ML: every test goal once (``num_evals`` = 50 goals per test class, one env per class), 10
    adaptation episodes, 1 adaptation step, 3 evaluation episodes; MT: 50 evaluation episodes per
    class; 500-step episodes for both. ``protocol: custom`` uses the arguments (quick runs).

    Args:
        every_n_epochs: evaluate after every n-th training epoch; 0 never during ``fit``.
        protocol: ``official`` (published counts, above) or ``custom`` (the counts below).
        num_evals: ML only: rounds of test goals per test class (metaworld's default is 10);
            ``null``: every test goal once.
        adaptation_episodes: ML only: episodes per task collected before the inner update.
        evaluation_episodes: episodes per task after adaptation (ML) or per class (MT).
        max_episode_steps: episode length; ``null``: the data module's ``max_episode_steps``.
        envs_per_class: ML only: test goals adapted to in parallel per class. More than 1 is faster
            but overstates success under metaworld's counting (docs/results.md, "Protocol").
        eval_actions: ML only: ``mean`` (the published protocol: the adapted policy's mean action) or
            ``sample`` (its sampled actions, labelled as such in the counts; for diagnosis).
        eval_state: ML only, agents with trial memory (``data.reset_state_on: trial``): where each
            evaluation episode starts: ``carry`` (where the previous episode ended: one trial from the
            first adaptation episode to the last evaluation episode) or ``adapted`` (the state the
            adaptation episodes left, as the Meta-World+ reference RL^2 agent; recorded in the counts).
        split: ML only: ``test`` (the held-out classes and goals: meta-test success) or ``train``
            (the same protocol on the training classes and goals: meta-train success, logged as
            ``eval_train/...`` and recorded in the counts). MT benchmarks evaluate their training
            tasks either way.
        at_fit_end: also evaluate after the last training epoch of ``fit`` (``trainer.max_epochs``),
            whatever ``every_n_epochs`` says: one number at the end of a run, whatever its budget
            (``configs/eval/official_at_end.yaml``). Never twice for the same epoch.
        on_validate: also evaluate at the end of the ``validate`` subcommand.
        on_test: also evaluate at the end of the ``test`` subcommand.
    """

    OFFICIAL_ML = {"num_evals": None, "adaptation_episodes": 10, "evaluation_episodes": 3, "envs_per_class": 1}
    OFFICIAL_MT_EPISODES = 50
    OFFICIAL_EPISODE_STEPS = 500

    def __init__(
        self,
        every_n_epochs: int = 1,
        protocol: Literal["official", "custom"] = "custom",
        num_evals: int | None = 10,
        adaptation_episodes: int = 10,
        evaluation_episodes: int = 3,
        max_episode_steps: int | None = None,
        envs_per_class: int = 1,
        eval_actions: Literal["mean", "sample"] = "mean",
        eval_state: Literal["carry", "adapted"] = "carry",
        split: Literal["test", "train"] = "test",
        at_fit_end: bool = False,
        on_validate: bool = True,
        on_test: bool = True,
    ) -> None:
        if eval_actions not in ("mean", "sample"):
            raise ValueError(f"MetaWorldEvaluation.eval_actions: must be 'mean' or 'sample', got {eval_actions!r}")
        if eval_state not in ("carry", "adapted"):
            raise ValueError(f"MetaWorldEvaluation.eval_state: must be 'carry' or 'adapted', got {eval_state!r}")
        if split not in ("test", "train"):
            raise ValueError(f"MetaWorldEvaluation.split: must be 'test' or 'train', got {split!r}")
        if protocol not in ("official", "custom"):
            raise ValueError(f"MetaWorldEvaluation.protocol: must be 'official' or 'custom', got {protocol!r}")
        for name, value, low in (
            ("every_n_epochs", every_n_epochs, 0),
            ("num_evals", 1 if num_evals is None else num_evals, 1),
            ("adaptation_episodes", adaptation_episodes, 1),
            ("evaluation_episodes", evaluation_episodes, 1),
            ("envs_per_class", envs_per_class, 1),
        ):
            if value < low:
                raise ValueError(f"MetaWorldEvaluation.{name}: must be >= {low}, got {value}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"MetaWorldEvaluation.max_episode_steps: must be >= 1 or null, got {max_episode_steps}")
        self.every_n_epochs = every_n_epochs
        self.protocol = protocol
        self.num_evals = num_evals
        self.adaptation_episodes = adaptation_episodes
        self.evaluation_episodes = evaluation_episodes
        self.max_episode_steps = max_episode_steps
        self.envs_per_class = envs_per_class
        self.eval_actions = eval_actions
        self.eval_state = eval_state
        self.split = split
        self.at_fit_end = at_fit_end
        self.on_validate = on_validate
        self.on_test = on_test
        self._skip_noted = False
        self.last_result: dict[str, Any] | None = None

    def counts(self, benchmark_name: str, data_episode_steps: int | None) -> dict[str, Any]:
        """The protocol's counts for ``benchmark_name`` (what is run and what is recorded with it)."""
        official = self.protocol == "official"
        steps = self.OFFICIAL_EPISODE_STEPS if official else (self.max_episode_steps or data_episode_steps)
        if benchmark_name.startswith("ML"):
            ml = self.OFFICIAL_ML if official else {
                "num_evals": self.num_evals,
                "adaptation_episodes": self.adaptation_episodes,
                "evaluation_episodes": self.evaluation_episodes,
                "envs_per_class": self.envs_per_class,
            }
            counts = {"protocol": self.protocol, **ml, "max_episode_steps": steps}
            if self.eval_actions == "sample":  # only recorded when it departs from the protocol
                counts["eval_actions"] = "sample"
            if self.eval_state == "adapted":  # the agent's choice, recorded beside the counts
                counts["eval_state"] = "adapted"
            if self.split == "train":  # meta-train success: never to be read as a test number
                counts["split"] = "train"
            return counts
        episodes = self.OFFICIAL_MT_EPISODES if official else self.evaluation_episodes
        return {"protocol": self.protocol, "evaluation_episodes": episodes, "max_episode_steps": steps}

    # ------------------------------------------------------------------------------------ hooks
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate after every ``every_n_epochs``-th training epoch (and the last, with ``at_fit_end``)."""
        epoch = trainer.current_epoch + 1
        periodic = bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0
        # max_epochs -1 (or None) has no last epoch to recognise: at_fit_end then never fires.
        last = self.at_fit_end and trainer.max_epochs is not None and epoch == trainer.max_epochs
        if periodic or last:
            self._evaluate_and_log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate at the end of ``validate`` (not of fit's own validation loops)."""
        if self.on_validate and trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._evaluate_and_log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate at the end of ``test``."""
        if self.on_test:
            self._evaluate_and_log(trainer, pl_module)

    # ---------------------------------------------------------------------------------- helpers
    def _settings(self, trainer: L.Trainer) -> dict[str, Any] | None:
        """What to evaluate, read off the data module; ``None`` when it is not Meta-World."""
        dm = trainer.datamodule
        benchmark = getattr(dm, "benchmark", None)
        if not isinstance(benchmark, str) or not benchmark.startswith(("ML", "MT")):
            if not self._skip_noted:
                self._skip_noted = True
                log.info("MetaWorldEvaluation: benchmark %r is not Meta-World; skipping evaluation", benchmark)
            return None
        return {
            "benchmark_name": benchmark,
            "env_name": getattr(dm, "env_name", None),
            "seed": int(getattr(dm, "seed", 0)),
            "counts": self.counts(benchmark, getattr(dm, "max_episode_steps", None)),
            "fast": bool(getattr(dm, "fast_envs", True)),
            "cache_dir": getattr(dm, "benchmark_cache_dir", None),
            "one_hot": bool(getattr(dm, "task_one_hot", False)),
            # In-context agents: the context inputs and the trial memory they were trained with.
            "context_reward_scale": getattr(dm, "context_reward_scale", None) if getattr(dm, "context_inputs", False) else None,
            "context_action_scale": float(getattr(dm, "context_action_scale", 1.0)),
            "trial_memory": getattr(dm, "reset_state_on", "episode") == "trial",
        }

    def evaluate(self, pl_module: L.LightningModule, settings: dict[str, Any]) -> dict[str, Any]:
        """Run the protocol for ``settings`` (from the data module) on this process."""
        counts = settings["counts"]
        common = {k: settings[k] for k in ("benchmark_name", "env_name", "seed", "fast", "cache_dir")}
        common["max_episode_steps"] = counts["max_episode_steps"]
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Validation may run under inference_mode, in which the inner update cannot take grads.
            with torch.inference_mode(False), torch.enable_grad():
                if settings["benchmark_name"].startswith("ML"):
                    return evaluate_meta_learning(
                        pl_module,
                        num_evals=counts["num_evals"],
                        adaptation_episodes=counts["adaptation_episodes"],
                        evaluation_episodes=counts["evaluation_episodes"],
                        envs_per_class=counts["envs_per_class"],
                        sample_eval_actions=counts.get("eval_actions") == "sample",
                        context_reward_scale=settings.get("context_reward_scale"),
                        trial_memory=settings.get("trial_memory", False),
                        context_action_scale=settings.get("context_action_scale", 1.0),
                        eval_state=counts.get("eval_state", "carry"),
                        split=counts.get("split", "test"),
                        **common,
                    )
                return evaluate_multi_task(
                    pl_module, num_episodes=counts["evaluation_episodes"], task_one_hot=settings["one_hot"], **common
                )
        finally:
            pl_module.train(was_training)

    def _evaluate_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        settings = self._settings(trainer)
        if settings is None:
            return
        result = self.evaluate(pl_module, settings) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            # Every rank is here (Lightning calls callback hooks on all ranks): no deadlock.
            result = trainer.strategy.broadcast(result, src=0)
        assert result is not None
        result = {**result, "counts": settings["counts"]}
        self.last_result = result
        prefix = metric_prefix(settings["counts"])
        metrics = {f"{prefix}/success_rate": result["success_rate"], f"{prefix}/return": result["return"]}
        metrics.update({f"{prefix}/success/{task}": rate for task, rate in result["success_per_task"].items()})
        # Identical on every rank after the broadcast: no sync needed.
        pl_module.log_dict({k: float(v) for k, v in metrics.items()}, on_step=False, on_epoch=True, sync_dist=False)
        pl_module.log(f"{prefix}_success", float(result["success_rate"]), prog_bar=True, logger=False, on_step=False, on_epoch=True, sync_dist=False)
        rank_zero_info(_summary_line(result, int(getattr(pl_module, "env_steps", 0))))
        if trainer.state.fn == TrainerFn.FITTING:
            # The results writer keeps the curve (results.json, training_curves.png, per-task table).
            for callback in trainer.callbacks:
                if isinstance(callback, ResultsWriter):
                    callback.record_protocol_evaluation(trainer, pl_module, result)


def _summary_line(result: dict[str, Any], env_steps: int) -> str:
    """What the terminal shows after an evaluation, e.g. ``Meta-World evaluation (official, ...): success 0.62``."""
    counts = result["counts"]
    detail = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "protocol" and v is not None)
    per_task = ", ".join(f"{name} {rate:.2f}" for name, rate in result["success_per_task"].items())
    return (f"Meta-World evaluation ({counts['protocol']}: {detail}) after {env_steps:,} env steps: "
            f"success rate {result['success_rate']:.3f} ({per_task})")
