"""Environment classes used by the workers: the stock Meta-World v3 classes, or fast subclasses.

The fast subclasses (``classes.py``) give the same observations, rewards, infos and resets bit for bit
at 2-3x the step rate; ``tests/test_fast_envs.py`` proves it for all 50 v3 environments. Bit identity
was verified against one pair of versions only, so any other installed metaworld/mujoco gets the
stock classes and one warning. Nothing in the metaworld module is patched.
"""

from __future__ import annotations

import functools
import warnings
from importlib.metadata import PackageNotFoundError, version

from metaworld.env_dict import ALL_V3_ENVIRONMENTS

# The versions the identity test was run against: the fast code copies their arithmetic.
VERIFIED_VERSIONS: dict[str, str] = {"metaworld": "3.1.1", "mujoco": "3.3.0"}

_warned = False


@functools.cache  # read once per process: parsing the metadata cost ~4 ms for every env built
def _installed_version(package: str) -> str | None:
    """The installed distribution version of ``package``, or None when it has no metadata."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def fast_envs_verified() -> bool:
    """Whether the installed metaworld and mujoco are the versions the fast path was verified on."""
    return all(_installed_version(p) == v for p, v in VERIFIED_VERSIONS.items())


def env_class(env_name: str, fast: bool = True) -> type:
    """The class to instantiate for a Meta-World v3 environment name (e.g. ``"reach-v3"``).

    Args:
        env_name: a key of ``metaworld.env_dict.ALL_V3_ENVIRONMENTS``.
        fast: prefer the bit-identical fast subclass when one is available and verified.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    global _warned
    if env_name not in ALL_V3_ENVIRONMENTS:
        valid = ", ".join(sorted(ALL_V3_ENVIRONMENTS))
        raise ValueError(f"env_name: unknown Meta-World environment {env_name!r}; valid: {valid}")
    if not fast:
        return ALL_V3_ENVIRONMENTS[env_name]
    if not fast_envs_verified():
        if not _warned:
            _warned = True
            found = {p: _installed_version(p) for p in VERIFIED_VERSIONS}
            warnings.warn(
                f"fast Meta-World envs are verified for {VERIFIED_VERSIONS} only, found {found}: "
                "using the stock classes (set data.fast_envs: false to silence this)",
                RuntimeWarning,
                stacklevel=2,
            )
        return ALL_V3_ENVIRONMENTS[env_name]
    # Imported here so that an unverified install never even loads the fast code.
    from metarl_lightning.envs.fast.classes import FAST_CLASSES

    return FAST_CLASSES[env_name]
