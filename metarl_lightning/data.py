"""MetaTaskDataModule: the environments, the rollout collectors, and the stream of meta-batches.

The DataLoader only says *which* tasks to run (and with what exploration noise); the rollouts
themselves are collected inside ``training_step`` because the query rollouts need the adapted
parameters. Tasks and noise of meta-iteration ``i`` are a pure function of ``(seed, i)``, so a
resumed run samples exactly what the uninterrupted run would have, with no generator state to
carry, and the global meta-batch is the same whatever the number of ranks: each rank takes its
contiguous shard.
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from metarl_lightning.envs.base import METAWORLD_ACTION_DIM, METAWORLD_OBS_DIM, TaskVectorEnv
from metarl_lightning.envs.context import METAWORLD_CONTEXT_REWARD_SCALE, NAV2D_CONTEXT_REWARD_SCALE, context_dim
from metarl_lightning.envs.navigation import Navigation2DVectorEnv
from metarl_lightning.errors import ConfigError, require
from metarl_lightning.meta_batch import MetaBatch
from metarl_lightning.rollouts import RolloutCollector
from metarl_lightning.threads import learner_threads, runnable_elsewhere, usable_cores

NAV2D = "nav2d"
METAWORLD_BENCHMARKS = ("MT1", "MT10", "MT50", "ML1", "ML10", "ML45")
VALID_BENCHMARKS = (NAV2D, *METAWORLD_BENCHMARKS)


def _stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, stable across processes (unlike ``hash``)."""
    digest = np.random.SeedSequence([zlib.crc32(str(p).encode()) for p in parts]).generate_state(2, np.uint32)
    return int(digest[0]) << 31 | int(digest[1]) >> 1


class _MetaBatchStream(IterableDataset):
    """``batches`` meta-batches of one split; the epoch is read from the trainer at iteration time."""

    def __init__(self, datamodule: "MetaTaskDataModule", split: str, batches: int) -> None:
        self.datamodule = datamodule
        self.split = split
        self.batches = batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[MetaBatch]:
        trainer = self.datamodule.trainer
        # Evaluation uses the same tasks every time so its curve compares like with like.
        epoch = trainer.current_epoch if (trainer is not None and self.split == "train") else 0
        for index in range(self.batches):
            batch = self.datamodule.meta_batch(self.split, epoch * self.batches + index)
            self.datamodule.set_learner_threads()  # sampled now: the load may have changed since the last batch
            yield batch


DEFAULT_MAX_ENVS = 100  # Meta-World envs per env set when envs_per_task is left to the default


def default_envs_per_task(benchmark: str, meta_batch_size: int, rollouts_per_task: int) -> int:
    """All rollouts in parallel for nav2d; for Meta-World as many as fit ``DEFAULT_MAX_ENVS``."""
    if benchmark == NAV2D:
        return rollouts_per_task
    divisors = [d for d in range(1, rollouts_per_task + 1) if rollouts_per_task % d == 0]
    return max(d for d in divisors if d == 1 or meta_batch_size * d <= DEFAULT_MAX_ENVS)


class MetaTaskDataModule(L.LightningDataModule):
    """Meta-RL tasks: a benchmark, its train/test split, and the environments to run them in.

    Args:
        benchmark: ``nav2d`` (2-D point navigation, MAML paper) or a Meta-World benchmark:
            MT1, MT10, MT50, ML1, ML10, ML45.
        env_name: the environment of MT1/ML1 (e.g. ``reach-v3``); must be null for the other benchmarks.
        meta_batch_size: task-agents per meta-iteration (over all ranks; must divide by the number
            of ranks). ML benchmarks: a multiple of the train class count. MT benchmarks: any size;
            one that is not a multiple walks on through the classes from one meta-iteration to the
            next (MT10 with 4: classes 0-3, 4-7, 8-9 and 0-1, ...), covering each class equally
            over ``lcm(size, classes) / size`` iterations, and rebuilds a slot's simulators when its
            class changes (~0.1-0.2 s per simulator).
        rollouts_per_task: trajectories per task for support and for query rollouts
            (``--inner-batch-size`` of the original runner).
        envs_per_task: parallel environments per task; must divide ``rollouts_per_task`` (each env
            then runs ``rollouts_per_task / envs_per_task`` consecutive episodes). More envs per
            step amortise the learner's per-step cost (on MT10 the S5 collector reached 0.86 of
            random stepping with 10 envs per task vs 0.65-0.70 with 2; README, benchmarks), but a
            Meta-World env holds ~26 MB. ``null``: all rollouts in parallel for nav2d; for
            Meta-World the largest divisor of ``rollouts_per_task`` that keeps
            ``meta_batch_size * envs_per_task <= 100`` (~2.6 GB per env set).
        max_episode_steps: horizon; ``null`` uses the benchmark's (nav2d 100, Meta-World 500).
        meta_batches_per_epoch: meta-iterations per epoch.
        num_eval_tasks: test tasks per evaluation (over all ranks); ``null``: ``meta_batch_size``.
        eval_rollouts_per_task: trajectories per test task for the support (adaptation) and the
            query (evaluation) rollouts of an evaluation; ``null``: ``rollouts_per_task``. Must be
            a multiple of ``envs_per_task``.
        eval_meta_batches: meta-batches of ``num_eval_tasks`` test tasks per evaluation.
        num_env_workers: environment worker processes per rank; 0 steps in-process; ``null``: the
            CPU cores available to this rank. Meta-World only (nav2d is one numpy array).
        learner_threads: torch intra-op threads of the learner (adaptation and update); the
            acting step runs on 1 while env workers step. ``null``: chosen at every meta-iteration
            from the cores this rank may use (affinity mask, cgroup quota) less the ones other jobs
            keep busy at that moment (``metarl_lightning.threads``), at most torch's setting before
            the first batch; ``OMP_NUM_THREADS``, when set, is followed instead. The count sets the
            float rounding of gradient sums: runs repeat bit for bit at equal counts.
        fast_envs: use the bit-identical fast Meta-World classes when the installed versions are
            verified.
        task_one_hot: append a one-hot task id to observations (MT benchmarks).
        reset_state_on: ``episode`` (zero the recurrent state at every episode start) or ``trial``
            (only at trial starts: memory across the episodes of one task; inside a trial an
            episode end does not cut the return either, as in RL^2). The Meta-World evaluation
            then keeps the state from the first adaptation episode to the last evaluation episode
            of a task.
        episodes_per_trial: with ``reset_state_on: trial``, a trial is this many consecutive
            episodes of one env (one task); must divide the episodes each env runs per rollout,
            ``rollouts_per_task / envs_per_task`` (and ``eval_rollouts_per_task / envs_per_task``).
            ``null``: all of them (one trial per env and rollout). Several envs per task run
            several trials of it side by side, which keeps the policy calls wide.
        query_state: MAML with ``reset_state_on: trial``: where the query rollouts' trials start.
            ``fresh``: from the zero state, a new trial. ``carry``: each env's query trial goes on
            from the state (and context inputs) where its support trial ended, as Meta-World's
            evaluation runs a trial-memory agent (the adaptation episodes' state carries into the
            evaluation episodes). The carried state is a constant of the outer loss, like the
            support samples themselves.
        context_inputs: append the previous action, the previous reward (times
            ``context_reward_scale``) and an episode-start flag to every observation, zero at a
            trial start (``metarl_lightning.envs.context``): the input an in-context (RL^2) agent
            adapts from. nav2d and ML benchmarks only (MT goals are visible; its evaluation draws a
            new goal at every reset).
        context_reward_scale: scale of the reward input; ``null``: 0.1 for Meta-World (rewards
            reach 10 per step), 1.0 for nav2d (minus a distance, at most ~1.4), so it is O(1).
        context_action_scale: scale of the previous-action input; 0 keeps the layout but makes it
            always 0 (the policy adapts from rewards, done flags and what it observes). The official
            protocol scores the mean action, so a policy that saw its sampled actions (std ~1:
            mostly noise) in training meets unseen action inputs in the evaluation episodes.
        compile_policy: run the collector's acting step through ``torch.compile`` (seconds of
            compilation per rollout shape). The native MLP/SSM acting steps gain nothing from it;
            policies on the generic vmap path (GRU, custom) do.
        pipeline_rollouts: with 2+ env workers, act for one half of the agents while the other
            half's workers step (identical rollouts). On the 2-core box it lifted the S5 collector
            from ~0.75 to 0.81-0.86 of random stepping at ~100 envs per step and did not pay at 20
            (README, benchmarks).
        seed: seeds tasks, exploration noise and simulators.
        benchmark_cache_dir: where built Meta-World benchmarks are pickled (``null``: the default
            ``~/.cache/metarl_lightning``).
    """

    def __init__(
        self,
        benchmark: str = NAV2D,
        env_name: str | None = None,
        meta_batch_size: int = 20,
        rollouts_per_task: int = 10,
        envs_per_task: int | None = None,
        max_episode_steps: int | None = None,
        meta_batches_per_epoch: int = 1,
        num_eval_tasks: int | None = None,
        eval_rollouts_per_task: int | None = None,
        eval_meta_batches: int = 1,
        num_env_workers: int | None = None,
        learner_threads: int | None = None,
        fast_envs: bool = True,
        task_one_hot: bool = False,
        reset_state_on: str = "episode",
        episodes_per_trial: int | None = None,
        query_state: str = "fresh",
        context_inputs: bool = False,
        context_reward_scale: float | None = None,
        context_action_scale: float = 1.0,
        compile_policy: bool = False,
        pipeline_rollouts: bool = False,
        seed: int = 0,
        benchmark_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        require(benchmark in VALID_BENCHMARKS, "data.benchmark", f"unknown {benchmark!r}; valid: {', '.join(VALID_BENCHMARKS)}")
        if benchmark in ("MT1", "ML1"):
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS

            require(
                env_name in ALL_V3_ENVIRONMENTS,
                "data.env_name",
                f"unknown {env_name!r} for {benchmark}; valid: {', '.join(sorted(ALL_V3_ENVIRONMENTS))}",
            )
        require(meta_batch_size >= 1, "data.meta_batch_size", f"must be >= 1, got {meta_batch_size}")
        require(rollouts_per_task >= 1, "data.rollouts_per_task", f"must be >= 1, got {rollouts_per_task}")
        if envs_per_task is None:
            envs_per_task = default_envs_per_task(benchmark, meta_batch_size, rollouts_per_task)
        require(
            envs_per_task >= 1 and rollouts_per_task % envs_per_task == 0,
            "data.envs_per_task",
            f"must be >= 1 and divide rollouts_per_task={rollouts_per_task}, got {envs_per_task}",
        )
        if max_episode_steps is None:
            max_episode_steps = 100 if benchmark == NAV2D else 500
        require(max_episode_steps >= 1, "data.max_episode_steps", f"must be >= 1, got {max_episode_steps}")
        require(meta_batches_per_epoch >= 1, "data.meta_batches_per_epoch", f"must be >= 1, got {meta_batches_per_epoch}")
        num_eval_tasks = meta_batch_size if num_eval_tasks is None else num_eval_tasks
        require(num_eval_tasks >= 1, "data.num_eval_tasks", f"must be >= 1, got {num_eval_tasks}")
        eval_rollouts_per_task = rollouts_per_task if eval_rollouts_per_task is None else eval_rollouts_per_task
        require(
            eval_rollouts_per_task >= 1 and eval_rollouts_per_task % envs_per_task == 0,
            "data.eval_rollouts_per_task",
            f"must be a positive multiple of envs_per_task={envs_per_task}, got {eval_rollouts_per_task}",
        )
        require(eval_meta_batches >= 1, "data.eval_meta_batches", f"must be >= 1, got {eval_meta_batches}")
        require(learner_threads is None or learner_threads >= 1, "data.learner_threads", f"must be >= 1 or null, got {learner_threads}")
        require(num_env_workers is None or num_env_workers >= 0, "data.num_env_workers", f"must be >= 0 or null, got {num_env_workers}")
        require(reset_state_on in ("episode", "trial"), "data.reset_state_on", f"unknown {reset_state_on!r}; valid: episode, trial")
        if episodes_per_trial is not None:
            require(reset_state_on == "trial", "data.episodes_per_trial", "needs data.reset_state_on: trial (or null)")
            for name, rollouts in (("rollouts_per_task", rollouts_per_task), ("eval_rollouts_per_task", eval_rollouts_per_task)):
                episodes = rollouts // envs_per_task
                require(
                    episodes_per_trial >= 1 and episodes % episodes_per_trial == 0,
                    "data.episodes_per_trial",
                    f"must be >= 1 and divide the {episodes} episodes per env of a rollout "
                    f"({name} / envs_per_task), got {episodes_per_trial}",
                )
        require(query_state in ("fresh", "carry"), "data.query_state", f"unknown {query_state!r}; valid: fresh, carry")
        require(
            query_state == "fresh" or reset_state_on == "trial",
            "data.query_state",
            "carry needs data.reset_state_on: trial (with episode resets there is no state to carry)",
        )
        require(
            not context_inputs or not benchmark.startswith("MT"),
            "data.context_inputs",
            "only for nav2d and ML benchmarks (MT goals are visible and its evaluation draws a new goal at every reset)",
        )
        if context_reward_scale is None:
            context_reward_scale = NAV2D_CONTEXT_REWARD_SCALE if benchmark == NAV2D else METAWORLD_CONTEXT_REWARD_SCALE
        require(context_reward_scale > 0, "data.context_reward_scale", f"must be > 0 or null, got {context_reward_scale}")
        require(context_action_scale >= 0, "data.context_action_scale", f"must be >= 0, got {context_action_scale}")
        self.save_hyperparameters()
        self.benchmark = benchmark
        self.env_name = env_name
        self.meta_batch_size = meta_batch_size
        self.rollouts_per_task = rollouts_per_task
        self.envs_per_task = envs_per_task
        self.max_episode_steps = max_episode_steps
        self.meta_batches_per_epoch = meta_batches_per_epoch
        self.num_eval_tasks = num_eval_tasks
        self.eval_rollouts_per_task = eval_rollouts_per_task
        self.eval_meta_batches = eval_meta_batches
        self.num_env_workers = num_env_workers
        self.learner_threads = learner_threads
        self._thread_ceiling: int | None = None
        self.fast_envs = fast_envs
        self.task_one_hot = task_one_hot
        self.reset_state_on = reset_state_on
        self.episodes_per_trial = episodes_per_trial
        self.query_state = query_state
        self.context_inputs = context_inputs
        self.context_reward_scale = context_reward_scale
        self.context_action_scale = context_action_scale
        self.compile_policy = compile_policy
        self.pipeline_rollouts = pipeline_rollouts
        self.seed = seed
        self.benchmark_cache_dir = benchmark_cache_dir
        self._bench: Any = None
        self._envs: dict[str, TaskVectorEnv] = {}
        self._collectors: dict[str, RolloutCollector] = {}
        self._rank, self._world_size = 0, 1

    # ------------------------------------------------------------------------------ static shapes
    @property
    def observation_dim(self) -> int:
        """Observation size, known before any env is built (linked into ``model.policy``)."""
        context = context_dim(self.action_dim) if self.context_inputs else 0
        if self.benchmark == NAV2D:
            return Navigation2DVectorEnv.observation_dim + context
        extra = 0
        if self.task_one_hot:
            require(self.benchmark.startswith("MT"), "data.task_one_hot", "only for MT benchmarks (ML test classes are unseen)")
            from metarl_lightning.envs.benchmarks import CLASS_COUNTS  # metaworld: imported on use

            extra = CLASS_COUNTS[self.benchmark][0]  # MT: every class is a training class
        return METAWORLD_OBS_DIM + extra + context

    @property
    def env_observation_dim(self) -> int:
        """The env's own observation: the leading coordinates of the policy input, before the task
        one-hot and the context inputs (what ``model.normalize_observations`` standardises)."""
        return Navigation2DVectorEnv.observation_dim if self.benchmark == NAV2D else METAWORLD_OBS_DIM

    @property
    def action_dim(self) -> int:
        """Action size (linked into ``model.policy``)."""
        return Navigation2DVectorEnv.action_dim if self.benchmark == NAV2D else METAWORLD_ACTION_DIM

    @property
    def rollout_steps(self) -> int:
        """Steps per env in one training support (or query) rollout: whole episodes."""
        return (self.rollouts_per_task // self.envs_per_task) * self.max_episode_steps

    @property
    def eval_rollout_steps(self) -> int:
        """Steps per env in one evaluation support (or query) rollout."""
        return (self.eval_rollouts_per_task // self.envs_per_task) * self.max_episode_steps

    # ----------------------------------------------------------------------------------- building
    def check_world_size(self, world_size: int, fit: bool) -> None:
        """Every rank gets the same share of the tasks: the meta-batch (``fit``) and the
        evaluation tasks must divide over ``world_size`` ranks (devices x nodes)."""
        sizes = [("data.num_eval_tasks", self.num_eval_tasks)] + ([("data.meta_batch_size", self.meta_batch_size)] if fit else [])
        for field, size in sizes:
            require(
                size % world_size == 0,
                field,
                f"{size} does not divide over {world_size} ranks (devices x nodes); use a multiple of {world_size}",
            )

    def setup(self, stage: str) -> None:
        """Build the environments of this rank (once per process; later calls reuse them)."""
        trainer = self.trainer
        self._rank = trainer.global_rank if trainer is not None else 0
        self._world_size = trainer.world_size if trainer is not None else 1
        self.check_world_size(self._world_size, fit=True)
        self._load_benchmark()
        if stage == "fit":
            self._build("train", self.meta_batch_size)
        else:
            self._build("test", self.num_eval_tasks)
        # fit: the test envs are built by the first evaluation (eval_collector), not before the first step.

    def prestart(self) -> None:
        """Start building the training envs of a single-process fit, without waiting for them.

        The CLI calls this after its checks, before ``trainer.fit``: the env workers then build
        their simulators (~3-5 s for 100 Meta-World envs) while Lightning starts the MLflow run and
        sets up, and ``setup("fit")`` finds them started; the first ``reset`` waits for the rest
        (docs/benchmarks.md, "Start-up"). Only for one process: DDP ranks learn their rank in
        ``trainer.fit``.
        """
        self._rank, self._world_size = 0, 1
        self._load_benchmark()
        self._build("train", self.meta_batch_size, wait=False)

    def _load_benchmark(self) -> None:
        if self.benchmark != NAV2D and self._bench is None:
            from metarl_lightning.envs.benchmarks import make_benchmark

            try:
                self._bench = make_benchmark(self.benchmark, self.env_name, seed=self.seed, cache_dir=self.benchmark_cache_dir)
            except ValueError as error:  # the benchmark module names the field itself
                raise ConfigError(f"data.{error}") from error

    def _local_ranks(self) -> int:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", self._world_size)))

    def _workers(self) -> int:
        if self.num_env_workers is not None:
            return self.num_env_workers
        return max(1, usable_cores() // self._local_ranks())

    def set_learner_threads(self) -> None:
        """Set this process's torch threads for the coming learner phase (``learner_threads``)."""
        threads = self.learner_threads
        if threads is None and "OMP_NUM_THREADS" in os.environ:
            return  # the user's choice, which torch already follows
        if threads is None:
            if self._thread_ceiling is None:  # torch's setting before the first batch: never more
                self._thread_ceiling = torch.get_num_threads()
            chosen = learner_threads(usable_cores(), self._local_ranks(), runnable_elsewhere())
            threads = min(chosen, self._thread_ceiling)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def _build(self, split: str, global_agents: int, wait: bool = True) -> None:
        if split in self._envs:
            return
        agents = global_agents // self._world_size
        workers = 0 if self.benchmark == NAV2D else self._workers()  # nav2d is one numpy array
        if self.benchmark == NAV2D:
            env: TaskVectorEnv = Navigation2DVectorEnv(agents, self.envs_per_task, self.max_episode_steps)
        else:
            from metarl_lightning.envs.workers import MetaWorldVectorEnv

            classes = self._bench.slot_classes(split, global_agents)
            env = MetaWorldVectorEnv(
                self._bench,
                split,
                num_agents=agents,
                envs_per_agent=self.envs_per_task,
                num_workers=workers,
                max_episode_steps=self.max_episode_steps,
                seed=self.seed + 100_003 * self._rank + (0 if split == "train" else 50_021),
                fast=self.fast_envs,
                task_one_hot=self.task_one_hot,
                agent_classes=classes[self._rank * agents : (self._rank + 1) * agents],
                rotating=self._bench.rotates(split, global_agents),
                wait=wait,
            )
        self._envs[split] = env
        # Tiny per-step matmuls slow down many-fold when torch's threads fight the env workers for
        # the cores, so acting runs on one thread; the meta-update keeps all of them.
        acting_threads = 1 if workers > 0 else None
        self._collectors[split] = RolloutCollector(
            env,
            reset_state_on=self.reset_state_on,
            episodes_per_trial=self.episodes_per_trial,
            context_reward_scale=self.context_reward_scale if self.context_inputs else None,
            context_action_scale=self.context_action_scale,
            compile_policy=self.compile_policy,
            pipeline=self.pipeline_rollouts,
            acting_threads=acting_threads,
        )

    @property
    def train_collector(self) -> RolloutCollector:
        """Collector over the training tasks' environments."""
        return self._collectors["train"]

    @property
    def eval_collector(self) -> RolloutCollector:
        """Collector over the test tasks' environments (built on first use: a fit starts stepping without them)."""
        if "test" not in self._collectors:
            self._build("test", self.num_eval_tasks)
        return self._collectors["test"]

    @property
    def benchmark_info(self) -> Any:
        """The built Meta-World benchmark (``None`` for nav2d)."""
        return self._bench

    # ------------------------------------------------------------------------------- meta-batches
    def global_tasks(self, split: str, iteration: int) -> list[Any]:
        """All tasks of meta-iteration ``iteration`` over every rank (a pure function of the seed)."""
        size = self.meta_batch_size if split == "train" else self.num_eval_tasks
        rng = np.random.default_rng(_stream_seed(self.seed, split, iteration, "tasks"))
        if self.benchmark == NAV2D:
            return Navigation2DVectorEnv.sample_tasks(size, rng)
        return self._bench.sample_tasks(split, size, rng, iteration)

    def meta_batch(self, split: str, iteration: int) -> MetaBatch:
        """This rank's shard of meta-iteration ``iteration``: tasks and exploration noise."""
        tasks = self.global_tasks(split, iteration)
        agents = len(tasks) // self._world_size
        shard = slice(self._rank * agents, (self._rank + 1) * agents)
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, split, iteration, "noise"))
        steps = self.rollout_steps if split == "train" else self.eval_rollout_steps
        shape = (len(tasks), self.envs_per_task, steps, self.action_dim)
        support_noise = torch.randn(shape, generator=generator)[shard]
        query_noise = torch.randn(shape, generator=generator)[shard]
        return MetaBatch(iteration, split, tasks[shard], support_noise, query_noise)

    def train_dataloader(self) -> DataLoader:
        """``meta_batches_per_epoch`` training meta-batches per epoch."""
        return DataLoader(_MetaBatchStream(self, "train", self.meta_batches_per_epoch), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """``eval_meta_batches`` meta-batches of held-out (test-split) tasks, the same every time."""
        return DataLoader(_MetaBatchStream(self, "test", self.eval_meta_batches), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        """Same tasks as validation."""
        return self.val_dataloader()

    def teardown(self, stage: str) -> None:
        """Close worker processes and simulators."""
        for env in self._envs.values():
            env.close()
        self._envs.clear()
        self._collectors.clear()

    def state_dict(self) -> dict[str, Any]:
        """What decides the task stream; checked on resume (the stream itself is stateless)."""
        return {"seed": self.seed, "benchmark": self.benchmark, "env_name": self.env_name, "meta_batch_size": self.meta_batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume into a different task stream: it would not be the same run."""
        for key, value in state_dict.items():
            require(getattr(self, key) == value, f"data.{key}", f"checkpoint was made with {value!r}, config has {getattr(self, key)!r}")
