"""Environment classes used by the workers: the stock Meta-World v3 classes, or fast subclasses."""

from __future__ import annotations

from metaworld.env_dict import ALL_V3_ENVIRONMENTS


def env_class(env_name: str, fast: bool = True) -> type:
    """The class to instantiate for a Meta-World v3 environment name (e.g. ``"reach-v3"``).

    Args:
        env_name: a key of ``metaworld.env_dict.ALL_V3_ENVIRONMENTS``.
        fast: prefer the bit-identical fast subclass when one is available and verified.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if env_name not in ALL_V3_ENVIRONMENTS:
        valid = ", ".join(sorted(ALL_V3_ENVIRONMENTS))
        raise ValueError(f"env_name: unknown Meta-World environment {env_name!r}; valid: {valid}")
    return ALL_V3_ENVIRONMENTS[env_name]
