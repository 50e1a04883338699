"""The checkpoint-vs-command-line rule.

* ``fit --ckpt_path``: every model, policy and data value that an exact resume depends on must equal
  the checkpoint's; a difference is an error naming each key with both values (never a silent
  override: the optimiser state would otherwise restore the checkpoint's learning rate over a new
  ``meta_lr``). Trainer values (``max_epochs``, logging, callbacks) take the command line's value.
* ``validate`` / ``test``: the policy architecture comes from the checkpoint (the config need not
  repeat it); every other value is the command line's, honoured as given (e.g. another ``inner_lr``);
  training-only settings such as ``meta_batch_size`` need not match.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from metarl_lightning.errors import ConfigError

# Machine settings that may differ on resume: they leave the training trajectory as it is (the
# learner's thread count only changes the float rounding of gradient sums).
RESUME_MAY_CHANGE = frozenset({"data.num_env_workers", "data.learner_threads", "data.benchmark_cache_dir"})
# Policy arguments filled from the data module (links), not chosen by the user.
LINKED_POLICY_ARGS = frozenset({"observation_dim", "action_dim"})
POLICY_CONFIG_KEY = "policy_config"


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load ``path`` on the CPU, or fail with one line saying why it cannot be used.

    Raises:
        ConfigError: ``ckpt_path: ...`` for a missing, unreadable (truncated, not a torch file) or
            foreign checkpoint (no ``state_dict`` / ``hyper_parameters`` of a :class:`MetaRLModule`).
    """
    import torch

    if not os.path.exists(path):
        raise ConfigError(f"ckpt_path: {path} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path: {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # truncated zip, pickle garbage, a text file...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt_path: {path} is not a readable checkpoint ({reason[:200]})") from error
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"ckpt_path: {path} is not a metarl-lightning checkpoint (no state_dict and hyper_parameters)")
    if "policy_class" not in checkpoint:
        raise ConfigError(f"ckpt_path: {path} is not a metarl-lightning checkpoint (no policy_class: another project's?)")
    return dict(checkpoint)


def _normal(value: Any) -> Any:
    """Numbers compare by value (``1`` == ``1.0``), containers recursively, everything else as is."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return str(value)


def differences(
    saved: Mapping[str, Any],
    given: Mapping[str, Any],
    prefix: str,
    ignore: frozenset[str] = frozenset(),
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """``"<prefix>.<key> (checkpoint <a>, given <b>)"`` for each key whose values differ.

    Keys starting with ``_`` (Lightning's ``_instantiator``) and ``prefix.key`` in ``ignore`` are
    skipped. A key the checkpoint lacks (an option added after it was written) stands for its
    default in ``defaults``: options are added with a default that keeps the old behaviour.
    """
    defaults = defaults or {}
    out = []
    for key in sorted(set(saved) | set(given)):
        name = f"{prefix}.{key}"
        if str(key).startswith("_") or name in ignore:
            continue
        a, b = saved.get(key, defaults.get(key, "missing")), given.get(key, "missing")
        if _normal(a) != _normal(b):
            out.append(f"{name} (checkpoint {a!r}, given {b!r})")
    return out


def policy_config(policy: Mapping[str, Any]) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a policy config, without the linked env sizes."""
    init_args = {k: v for k, v in dict(policy.get("init_args") or {}).items() if k not in LINKED_POLICY_ARGS}
    return {"class_path": policy.get("class_path"), "init_args": init_args}


def init_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls.__init__``'s arguments."""
    return {
        name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if p.default is not inspect.Parameter.empty
    }


def resume_differences(
    checkpoint: Mapping[str, Any],
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    model_defaults: Mapping[str, Any] | None = None,
    data_defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Everything an exact resume depends on that differs between ``checkpoint`` and the config.

    Args:
        checkpoint: a loaded checkpoint (:func:`load_checkpoint`).
        model: the ``model`` section of the config as a dict (``policy`` included).
        data: the ``data`` section.
        model_defaults / data_defaults: init defaults (:func:`init_defaults`), standing for the keys
            an older checkpoint lacks.
    """
    model = dict(model)
    policy = model.pop("policy", None) or {}
    found = differences(checkpoint["hyper_parameters"], model, "model", defaults=model_defaults)
    found += differences(checkpoint.get("datamodule_hyper_parameters") or {}, dict(data), "data", RESUME_MAY_CHANGE, data_defaults)
    saved_policy = checkpoint.get(POLICY_CONFIG_KEY)
    given_policy = policy_config(policy)
    if saved_policy is not None:
        if saved_policy["class_path"] != given_policy["class_path"]:
            found.append(f"model.policy.class_path (checkpoint {saved_policy['class_path']!r}, given {given_policy['class_path']!r})")
        else:
            found += differences(saved_policy["init_args"], given_policy["init_args"], "model.policy.init_args")
    return found


def check_resume(path: str, checkpoint: Mapping[str, Any], model: Mapping[str, Any], data: Mapping[str, Any], **defaults: Any) -> None:
    """Raise one line naming every resume-critical value that differs from the checkpoint's.

    ``defaults``: ``model_defaults`` / ``data_defaults`` of :func:`resume_differences`.
    """
    found = resume_differences(checkpoint, model, data, **defaults)
    if found:
        raise ConfigError(
            f"ckpt_path: {path} was trained with other values of settings an exact resume depends on: "
            f"{'; '.join(found)}. Resume with the checkpoint's values, or start a new run in its own --trainer.default_root_dir"
        )


def check_epochs(path: str, checkpoint: Mapping[str, Any], max_epochs: int | None) -> None:
    """A resume needs ``max_epochs`` at least the checkpoint's epoch (Lightning refuses only after
    the MLflow run and the results files were reopened)."""
    done = int(checkpoint.get("epoch", 0))
    if max_epochs is not None and max_epochs != -1 and done > max_epochs:
        raise ConfigError(f"trainer.max_epochs: {max_epochs} is below the epoch {done} of {path}; give a larger --trainer.max_epochs to train on")


def check_state_dict(path: str, saved: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """The checkpoint's parameters fit the configured model: same names, same shapes.

    Args:
        path: for the message.
        saved: the checkpoint's ``state_dict``.
        expected: the configured model's ``state_dict()``.
    """
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{name} {list(saved[name].shape)} in the checkpoint, {list(expected[name].shape)} configured"
        for name in sorted(set(saved) & set(expected))
        if tuple(saved[name].shape) != tuple(expected[name].shape)
    ]
    odd = missing + unexpected
    if odd and not shapes and all(name.startswith("obs_normalizer.") for name in odd):
        trained = "with" if unexpected else "without"
        raise ConfigError(
            f"model.normalize_observations: {path} was trained {trained} observation normalisation; "
            f"set --model.normalize_observations {str(bool(unexpected)).lower()}"
        )
    problems = []
    if shapes:
        problems.append("shapes differ: " + ", ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if missing:
        problems.append("not in the checkpoint: " + ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        problems.append("not in the configured model: " + ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else ""))
    if problems:
        raise ConfigError(f"ckpt_path: {path} does not fit the configured model (other benchmark or policy?): {'; '.join(problems)}")
