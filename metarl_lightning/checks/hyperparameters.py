"""The module's hyperparameters, each against what it allows: checked when the module is built
(the CLI builds it before any output folder, MLflow run or env exists), one line naming the field."""

from __future__ import annotations

from typing import Any

from metarl_lightning.errors import require


def check_hyperparameters(
    *,
    agent_chunk_size: int | None,
    baseline: str,
    clip_epsilon: float,
    entropy_coef: float,
    exploration_coef: float,
    gae_lambda: float,
    gamma: float,
    inner_lr: float,
    inner_parameters: str,
    inner_steps: int,
    learn_inner_lr: bool,
    max_grad_norm: float | None,
    max_kl: float,
    meta_lr: float,
    meta_lr_final: float | None,
    outer_env_minibatches: int,
    outer_minibatch_size: int | None,
    outer_optimizer: str,
    ppo_epochs: int,
    reward_scale: float,
    ssm_lr: float | None,
    std_ceiling: float | None,
    std_ceiling_epochs: int,
    std_ceiling_on: str,
    success_bonus: float,
    target_kl: float | None,
    value_coef: float,
    weight_decay: float,
    **_others: Any,
) -> None:
    """Raise :class:`~metarl_lightning.errors.ConfigError` on the first value outside its range.

    Called as ``check_hyperparameters(**module.hparams)``; the arguments not checked here pass
    through ``_others``. Checks that need the policy stay in the module.
    """
    require(meta_lr > 0, "model.meta_lr", f"must be > 0, got {meta_lr}")
    require(inner_lr >= 0, "model.inner_lr", f"must be >= 0, got {inner_lr}")
    require(inner_steps >= 0, "model.inner_steps", f"must be >= 0, got {inner_steps}")
    require(0 <= gamma <= 1, "model.gamma", f"must be in [0, 1], got {gamma}")
    require(0 <= gae_lambda <= 1, "model.gae_lambda", f"must be in [0, 1], got {gae_lambda}")
    require(clip_epsilon > 0, "model.clip_epsilon", f"must be > 0, got {clip_epsilon}")
    require(ppo_epochs >= 1, "model.ppo_epochs", f"must be >= 1, got {ppo_epochs}")
    require(value_coef >= 0, "model.value_coef", f"must be >= 0, got {value_coef}")
    require(entropy_coef >= 0, "model.entropy_coef", f"must be >= 0, got {entropy_coef}")
    require(max_grad_norm is None or max_grad_norm > 0, "model.max_grad_norm", f"must be > 0 or null, got {max_grad_norm}")
    require(ssm_lr is None or ssm_lr > 0, "model.ssm_lr", f"must be > 0 or null, got {ssm_lr}")
    require(reward_scale > 0, "model.reward_scale", f"must be > 0, got {reward_scale}")
    require(target_kl is None or target_kl > 0, "model.target_kl", f"must be > 0 or null, got {target_kl}")
    require(baseline in ("critic", "linear"), "model.baseline", f"must be 'critic' or 'linear', got {baseline!r}")
    require(weight_decay >= 0, "model.weight_decay", f"must be >= 0, got {weight_decay}")
    require(agent_chunk_size is None or agent_chunk_size >= 1, "model.agent_chunk_size", f"must be >= 1 or null, got {agent_chunk_size}")
    require(
        outer_minibatch_size is None or outer_minibatch_size >= 1,
        "model.outer_minibatch_size",
        f"must be >= 1 or null, got {outer_minibatch_size}",
    )
    require(outer_env_minibatches >= 1, "model.outer_env_minibatches", f"must be >= 1, got {outer_env_minibatches}")
    require(outer_optimizer in ("ppo", "trpo"), "model.outer_optimizer", f"must be 'ppo' or 'trpo', got {outer_optimizer!r}")
    require(max_kl > 0, "model.max_kl", f"must be > 0, got {max_kl}")
    require(std_ceiling is None or 0 < std_ceiling <= 1, "model.std_ceiling", f"must be in (0, 1] or null, got {std_ceiling}")
    require(std_ceiling_on in ("policy", "adapted"), "model.std_ceiling_on", f"must be 'policy' or 'adapted', got {std_ceiling_on!r}")
    require(std_ceiling_epochs >= 1, "model.std_ceiling_epochs", f"must be >= 1, got {std_ceiling_epochs}")
    require(success_bonus >= 0, "model.success_bonus", f"must be >= 0, got {success_bonus}")
    require(exploration_coef >= 0, "model.exploration_coef", f"must be >= 0, got {exploration_coef}")
    require(
        exploration_coef == 0 or (outer_optimizer == "ppo" and inner_steps > 0),
        "model.exploration_coef",
        "needs a support rollout and the PPO outer step: inner_steps > 0 and outer_optimizer 'ppo' (or set it to 0)",
    )
    require(
        meta_lr_final is None or 0 <= meta_lr_final <= meta_lr,
        "model.meta_lr_final",
        f"must be in [0, model.meta_lr={meta_lr}] or null, got {meta_lr_final}",
    )
    require(
        outer_optimizer == "ppo" or (outer_minibatch_size is None and outer_env_minibatches == 1),
        "model.outer_optimizer",
        "trpo takes one step on the whole meta-batch: leave outer_minibatch_size null and outer_env_minibatches 1",
    )
    require(inner_parameters in ("all", "head"), "model.inner_parameters", f"must be 'all' or 'head', got {inner_parameters!r}")
    require(not learn_inner_lr or inner_lr > 0, "model.inner_lr", f"must be > 0 with learn_inner_lr, got {inner_lr}")
