"""Config values that Lightning or the builders would only reject late (mid-run, or after an MLflow
run and output files exist): checked on the parsed config, before anything is instantiated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metarl_lightning.envs.benchmarks import CLASS_COUNTS, check_names, meta_batch_problem
from metarl_lightning.errors import ConfigError, require

# Policy sizes that must be positive (a width of 0 would train a policy of nothing for hours).
_POSITIVE_POLICY_ARGS = ("hidden_dim", "state_dim", "num_layers", "hidden_size", "num_heads")


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Epoch counts and evaluation cadence (Lightning divides by ``check_val_every_n_epoch``)."""
    every = trainer.get("check_val_every_n_epoch")
    require(every is None or every >= 1, "trainer.check_val_every_n_epoch", f"must be >= 1 or null, got {every}")
    max_epochs = trainer.get("max_epochs")
    require(max_epochs is None or max_epochs >= -1, "trainer.max_epochs", f"must be >= 0 (or -1: no limit), got {max_epochs}")
    min_epochs = trainer.get("min_epochs")
    require(min_epochs is None or min_epochs >= 0, "trainer.min_epochs", f"must be >= 0, got {min_epochs}")


def check_lr_schedule(model: Mapping[str, Any], trainer: Mapping[str, Any]) -> None:
    """An annealed learning rate (``model.meta_lr_final``) falls over ``trainer.max_epochs``, which
    must then be a number of epochs (not -1, unbounded)."""
    if model.get("meta_lr_final") is None:
        return
    max_epochs = trainer.get("max_epochs")
    require(
        isinstance(max_epochs, int) and max_epochs >= 1,
        "trainer.max_epochs",
        f"model.meta_lr_final anneals the learning rate over it: set it >= 1, got {max_epochs}",
    )


def check_policy(policy: Mapping[str, Any]) -> None:
    """Positive sizes: widths, state sizes, layer counts, MLP hidden sizes."""
    init_args = dict(policy.get("init_args") or {})
    for key in _POSITIVE_POLICY_ARGS:
        value = init_args.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            require(value >= 1, f"model.policy.init_args.{key}", f"must be >= 1, got {value}")
    sizes = init_args.get("hidden_sizes")
    if isinstance(sizes, (list, tuple)):
        require(all(int(s) >= 1 for s in sizes), "model.policy.init_args.hidden_sizes", f"every size must be >= 1, got {list(sizes)}")


def check_benchmark(data: Mapping[str, Any], fit: bool) -> None:
    """Benchmark and env name, and meta-batch sizes that cover every class evenly.

    Args:
        data: the ``data`` section.
        fit: whether the training set is built (``validate``/``test`` build the evaluation set only).
    """
    benchmark = data.get("benchmark")
    if benchmark not in CLASS_COUNTS:
        return  # nav2d, or an unknown name the data module reports
    try:
        check_names(benchmark, data.get("env_name"))
    except ValueError as error:
        raise ConfigError(f"data.{error}") from None
    meta_batch_size = data.get("meta_batch_size")
    num_eval_tasks = data.get("num_eval_tasks") or meta_batch_size
    sizes = [("data.num_eval_tasks", num_eval_tasks, "test")]
    if fit:
        sizes.insert(0, ("data.meta_batch_size", meta_batch_size, "train"))
    for field, size, split in sizes:
        if isinstance(size, int) and size >= 1:
            problem = meta_batch_problem(benchmark, split, size)
            require(problem is None, field, problem or "")


def check_model(model: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """Outer minibatches over envs must split every task's envs evenly (``data.envs_per_task``);
    a carried query state needs a query rollout, i.e. an inner step."""
    require(
        data.get("query_state") != "carry" or model.get("inner_steps") != 0,
        "data.query_state",
        "carry needs model.inner_steps >= 1 (with 0 there is no query rollout: the one rollout is one trial)",
    )
    groups = model.get("outer_env_minibatches")
    envs = data.get("envs_per_task")
    if isinstance(groups, int) and isinstance(envs, int) and groups >= 1 and envs >= 1:
        require(
            envs % groups == 0,
            "model.outer_env_minibatches",
            f"{groups} does not divide data.envs_per_task={envs}; use a divisor of {envs}",
        )
