"""Meta-World v3 benchmarks (MT1 MT10 MT50 ML1 ML10 ML45): splits, task sampling, a disk cache.

The classes and goals come from the metaworld package's own benchmark classes (``metaworld.MT10``
and friends), so the goals are the published ones for a given seed. A built benchmark is plain data
(class names and picklable ``metaworld.types.Task`` descriptors), pickled to disk: building MT50 or
ML45 resets every environment 50 times (about a minute here), loading the pickle takes
milliseconds.

Splits:
    * ``"train"``: the classes and goals used for (meta-)training.
    * ``"test"``: for ML benchmarks the held-out classes (ML10/ML45) or held-out goals (ML1: the
      test goals metaworld draws with ``seed + 1``), never seen in training; for MT benchmarks the training classes and goals themselves (multi-task
      RL is evaluated on its training tasks, and metaworld's MT classes have an empty test set).

Slot layout: a meta-batch of ``num_agents`` task-agents runs ``slot_classes(split, num_agents)``:
agent ``k`` always runs class ``classes[k % n_classes]``, so the class of each agent never changes
across meta-batches and its simulators can be built once and reused; only the goal changes. An MT
meta-batch that is not a multiple of the class count walks on through the classes from one
iteration to the next instead (``slot_classes(split, num_agents, iteration)``).

Example:
    >>> bench = make_benchmark("ML10", seed=0)
    >>> tasks = bench.sample_tasks("train", 20, np.random.default_rng(0))  # 2 goals per class
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import metaworld
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.types import Task

BENCHMARKS: tuple[str, ...] = ("MT1", "MT10", "MT50", "ML1", "ML10", "ML45")
# Classes of the (train, test) split of each benchmark: known without building it.
CLASS_COUNTS: dict[str, tuple[int, int]] = {"MT1": (1, 1), "MT10": (10, 10), "MT50": (50, 50), "ML1": (1, 1), "ML10": (10, 5), "ML45": (45, 5)}
"""Benchmark names accepted by :func:`make_benchmark`."""

SPLITS: tuple[str, ...] = ("train", "test")

Split = Literal["train", "test"]

REWARD_FUNCTION_VERSION = "v2"
"""Reward function of every Meta-World v3 environment: the constructors default to ``"v2"`` in
metaworld 3.1.1 and the workers pass it explicitly, so an upstream change of default cannot
slip in."""

DEFAULT_CACHE_DIR = Path("~/.cache/metarl_lightning").expanduser()

# Bump when the pickled layout of `Benchmark` changes, so stale cache files are ignored.
_CACHE_FORMAT = 1


@dataclass
class Benchmark:
    """A built Meta-World benchmark: classes and goals for each split.

    Attributes:
        name: one of :data:`BENCHMARKS`.
        env_name: the single environment of MT1/ML1 (e.g. ``"reach-v3"``); ``None`` otherwise.
        seed: seed the goals were generated with (metaworld's task generation seed).
        train_classes: sorted environment names used for training.
        test_classes: sorted environment names of the test split (== ``train_classes`` for MT).
        train_tasks: for each training class, its 50 goals as ``metaworld.types.Task``.
        test_tasks: for each test class, its goals (== ``train_tasks`` for MT).
        is_meta_learning: True for ML benchmarks (goal hidden from observations, held-out split).
        metaworld_version: version of the metaworld package that generated the tasks.
        reward_function_version: Meta-World reward function the environments use (``"v2"``).
    """

    name: str
    env_name: str | None
    seed: int
    train_classes: list[str]
    test_classes: list[str]
    train_tasks: dict[str, list[Task]]
    test_tasks: dict[str, list[Task]]
    is_meta_learning: bool
    metaworld_version: str
    reward_function_version: str = REWARD_FUNCTION_VERSION

    @property
    def all_classes(self) -> list[str]:
        """Training classes, then the test-only classes: the index space of task one-hots.

        Both splits index into the same list, so a one-hot policy input keeps its size between
        training and evaluation.
        """
        extra = [c for c in self.test_classes if c not in self.train_classes]
        return list(self.train_classes) + extra

    def classes(self, split: Split) -> list[str]:
        """The sorted class names of ``split`` (``"train"`` or ``"test"``)."""
        _check_split(split)
        return self.train_classes if split == "train" else self.test_classes

    def tasks(self, split: Split) -> dict[str, list[Task]]:
        """The goals of each class of ``split``, keyed by class name."""
        _check_split(split)
        return self.train_tasks if split == "train" else self.test_tasks

    def rotates(self, split: Split, num_agents: int) -> bool:
        """Whether a meta-batch of ``num_agents`` changes the classes of its slots between
        iterations: an MT meta-batch that is not a multiple of the class count (see
        :meth:`slot_classes`)."""
        return self.name.startswith("MT") and num_agents % len(self.classes(split)) != 0

    def slot_classes(self, split: Split, num_agents: int, iteration: int = 0) -> list[str]:
        """The class each task-agent slot runs in meta-iteration ``iteration``.

        Slot ``k`` runs ``classes[(iteration * num_agents + k) % n_classes]``. For a multiple of the
        class count that is ``classes[k % n_classes]`` in every iteration, so environments are
        built once and reused. MT benchmarks take any size: consecutive iterations then walk on
        through the class list, so every class gets the same number of slots over
        ``lcm(num_agents, n_classes) / num_agents`` iterations (MT10 with 4: 5 iterations, each
        class twice), and a slot's simulators are rebuilt when its class changes.

        Args:
            split: ``"train"`` or ``"test"``.
            num_agents: number of task-agents in a meta-batch (the meta-batch size).
            iteration: the meta-iteration (only matters when :meth:`rotates`).

        Raises:
            ValueError: ``num_agents`` < 1, or (ML benchmarks) not a multiple of the number of
                classes: every class must get the same number of agents in every meta-batch, or
                the meta-gradient would weight classes unevenly.
        """
        classes = self.classes(split)
        n = len(classes)
        problem = meta_batch_problem(self.name, split, num_agents)
        if problem is not None:
            raise ValueError(f"meta_batch_size: {problem}")
        offset = (iteration * num_agents) % n
        return [classes[(offset + k) % n] for k in range(num_agents)]

    def sample_tasks(self, split: Split, num_agents: int, rng: np.random.Generator, iteration: int = 0) -> list[Task]:
        """Draw one task (goal) per agent slot, reproducibly from ``rng``.

        Agents that share a class get distinct goals when the class has enough of them (drawn
        without replacement within a meta-batch), so a meta-batch never repeats a task needlessly.

        Args:
            split: ``"train"`` or ``"test"``.
            num_agents: meta-batch size (see :meth:`slot_classes`).
            rng: the generator to draw from; the same state gives the same tasks.
            iteration: the meta-iteration (see :meth:`slot_classes`).

        Returns:
            ``num_agents`` tasks; task ``k`` belongs to ``slot_classes(split, num_agents, iteration)[k]``.
        """
        slots = self.slot_classes(split, num_agents, iteration)
        tasks_by_class = self.tasks(split)
        picks: dict[str, list[int]] = {}
        # One draw per class, without replacement: agents sharing a class get different goals.
        for name in self.classes(split):
            count = slots.count(name)
            if count == 0:
                continue
            n_goals = len(tasks_by_class[name])
            picks[name] = rng.choice(n_goals, size=count, replace=count > n_goals).tolist()
        out: list[Task] = []
        seen: dict[str, int] = {}
        for name in slots:
            occurrence = seen.get(name, 0)
            seen[name] = occurrence + 1
            out.append(tasks_by_class[name][picks[name][occurrence]])
        return out


def meta_batch_problem(name: str, split: Split, size: int) -> str | None:
    """What is wrong with ``size`` task-agents per meta-batch of benchmark ``name`` (``None``:
    nothing): at least 1, and for ML benchmarks a multiple of the split's class count (MT
    benchmarks take any size, see :meth:`Benchmark.slot_classes`)."""
    n = CLASS_COUNTS[name][0 if split == "train" else 1]
    if size >= 1 and (size % n == 0 or name.startswith("MT")):
        return None
    return f"{size} is not a positive multiple of the {n} {split} classes of {name}; use one of {n}, {2 * n}, {3 * n}, ..."


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: unknown {split!r}; valid: {', '.join(SPLITS)}")


def _group(tasks: list[Task], classes: list[str]) -> dict[str, list[Task]]:
    """Group metaworld's flat task list by class, keeping metaworld's goal order within a class."""
    grouped: dict[str, list[Task]] = {name: [] for name in classes}
    for task in tasks:
        grouped[task.env_name].append(task)
    return grouped


def check_names(name: str, env_name: str | None) -> None:
    """Raise ``ValueError`` (``"<field>: ..."``) for an unknown benchmark or an env name it does not take."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark: unknown {name!r}; valid: {', '.join(BENCHMARKS)}")
    if name in ("MT1", "ML1"):
        if env_name is None or env_name not in ALL_V3_ENVIRONMENTS:
            valid = ", ".join(sorted(ALL_V3_ENVIRONMENTS))
            got = "missing" if env_name is None else f"unknown {env_name!r}"
            raise ValueError(f"env_name: {got} for {name}; valid: {valid}")
    elif env_name is not None:
        raise ValueError(
            f"env_name: {name} takes none (got {env_name!r}); valid: only MT1 and ML1 take one"
        )


def build_benchmark(name: str, env_name: str | None = None, seed: int = 0) -> Benchmark:
    """Build a benchmark with metaworld's task generation, bypassing the cache (slow: module doc).

    Args:
        name: one of :data:`BENCHMARKS`.
        env_name: the environment for MT1/ML1 (e.g. ``"reach-v3"``); must be ``None`` otherwise.
        seed: seed of metaworld's goal generation.

    Raises:
        ValueError: a one-line message naming the bad field and listing the valid values.
    """
    check_names(name, env_name)
    if name in ("MT1", "ML1"):
        mw = getattr(metaworld, name)(env_name, seed=seed)
    else:
        mw = getattr(metaworld, name)(seed=seed)
    is_ml = name.startswith("ML")
    train_classes = sorted(mw.train_classes)
    train_tasks = _group(list(mw.train_tasks), train_classes)
    if is_ml:
        test_classes = sorted(mw.test_classes)
        test_tasks = _group(list(mw.test_tasks), test_classes)
    else:
        # metaworld's MT benchmarks have no test set: evaluation runs the training goals.
        test_classes, test_tasks = list(train_classes), train_tasks
    return Benchmark(
        name=name,
        env_name=env_name,
        seed=seed,
        train_classes=train_classes,
        test_classes=test_classes,
        train_tasks=train_tasks,
        test_tasks=test_tasks,
        is_meta_learning=is_ml,
        metaworld_version=importlib.metadata.version("metaworld"),
    )


def cache_path(
    name: str, env_name: str | None, seed: int, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where :func:`make_benchmark` caches a benchmark; the key includes the metaworld version."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    version = importlib.metadata.version("metaworld")
    env_part = f"-{env_name}" if env_name else ""
    return root / f"{name}{env_part}-seed{seed}-mw{version}-fmt{_CACHE_FORMAT}.pkl"


def make_benchmark(
    name: str,
    env_name: str | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Benchmark:
    """Build a benchmark, or load it from the disk cache.

    Args:
        name: one of :data:`BENCHMARKS`.
        env_name: the environment for MT1/ML1 (e.g. ``"reach-v3"``); must be ``None`` otherwise.
        seed: seed of metaworld's goal generation.
        cache_dir: cache folder; ``None`` means ``~/.cache/metarl_lightning``.
        use_cache: read and write the cache; ``False`` always builds (and writes nothing).

    Raises:
        ValueError: a one-line message naming the bad field and listing the valid values.
    """
    check_names(name, env_name)
    if not use_cache:
        return build_benchmark(name, env_name, seed)
    path = cache_path(name, env_name, seed, cache_dir)
    if path.exists():
        try:
            with open(path, "rb") as f:
                bench = pickle.load(f)
            if isinstance(bench, Benchmark):
                return bench
        except Exception:  # noqa: BLE001 - a corrupt or stale cache file is rebuilt, not fatal
            pass
    bench = build_benchmark(name, env_name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: several processes (DDP ranks, test workers) may build the same benchmark
    # at once, and a reader must never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(bench, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return bench
