"""Cores and learner threads: cgroup quotas, other jobs' load, and the data module applying it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metarl_lightning.data import MetaTaskDataModule
from metarl_lightning.threads import cgroup_quota_cores, learner_threads, runnable_elsewhere, usable_cores


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota_cores(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota_cores(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path) == 1  # half a core still runs one thread


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota_cores(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cgroup_quota_cores(tmp_path) == 1.0
    assert usable_cores(tmp_path) == 1


def test_usable_cores_is_the_affinity_mask_without_a_quota(tmp_path: Path) -> None:
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_learner_threads_is_the_rank_share_less_the_busy_cores() -> None:
    assert learner_threads(8) == 8
    assert learner_threads(8, local_ranks=2) == 4
    assert learner_threads(8, busy_elsewhere=6) == 2
    assert learner_threads(2, busy_elsewhere=2) == 1
    assert learner_threads(2, busy_elsewhere=7) == 1
    assert learner_threads(1, local_ranks=4) == 1


def test_runnable_elsewhere_reads_the_machine_less_this_process(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  1 2 3\nprocs_running 5\nprocs_blocked 0\n")
    for tid, state in ((1, "R"), (2, "S"), (3, "R")):
        (tmp_path / "self" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "self" / "task" / str(tid) / "stat").write_text(f"{tid} (python (x)) {state} 1 2 3\n")
    assert runnable_elsewhere(tmp_path) == 3
    assert runnable_elsewhere(tmp_path / "missing") == 0


def test_runnable_elsewhere_sees_a_busy_process() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert max(runnable_elsewhere() for _ in range(5)) >= 1
    finally:
        busy.kill()
        busy.wait()


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_data_module_sets_the_configured_learner_threads(restore_threads, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data = MetaTaskDataModule("nav2d", meta_batch_size=2, rollouts_per_task=2, max_episode_steps=5, learner_threads=1)
    torch.set_num_threads(2)
    data.set_learner_threads()
    assert torch.get_num_threads() == 1


def test_data_module_never_goes_above_the_callers_thread_setting(restore_threads, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("metarl_lightning.data.runnable_elsewhere", lambda: 0)  # a quiet machine
    monkeypatch.setattr("metarl_lightning.data.usable_cores", lambda: 4)
    data = MetaTaskDataModule("nav2d", meta_batch_size=2, rollouts_per_task=2, max_episode_steps=5)
    torch.set_num_threads(1)  # e.g. a test or notebook that fixed it before fitting
    data.set_learner_threads()
    assert torch.get_num_threads() == 1
    busy = MetaTaskDataModule("nav2d", meta_batch_size=2, rollouts_per_task=2, max_episode_steps=5)
    torch.set_num_threads(4)
    monkeypatch.setattr("metarl_lightning.data.runnable_elsewhere", lambda: 3)  # three busy threads elsewhere
    busy.set_learner_threads()
    assert torch.get_num_threads() == 1
    monkeypatch.setattr("metarl_lightning.data.runnable_elsewhere", lambda: 0)  # the load went away
    busy.set_learner_threads()
    assert torch.get_num_threads() == 4


def test_data_module_follows_omp_num_threads(restore_threads, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = MetaTaskDataModule("nav2d", meta_batch_size=2, rollouts_per_task=2, max_episode_steps=5)
    torch.set_num_threads(2)
    data.set_learner_threads()
    assert torch.get_num_threads() == 2  # left as the user's environment made it


def test_data_module_refuses_zero_learner_threads() -> None:
    from metarl_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="data.learner_threads"):
        MetaTaskDataModule("nav2d", learner_threads=0)
