"""The goal-distance diagnosis reads the distance of an episode's last step from ``final_info``."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "diagnose_goal_distance.py"
spec = importlib.util.spec_from_file_location("diagnose_goal_distance", SCRIPT)
diagnosis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diagnosis)


class FakeVectorEnv:
    """Two envs, same-step autoreset as gymnasium's: a done step's own info is under ``final_info``."""

    num_envs = 2

    def __init__(self, steps):
        self._steps = iter(steps)

    def step(self, actions):
        terminated, truncated, infos = next(self._steps)
        return None, np.zeros(2), np.array(terminated), np.array(truncated), infos


def _info(distances, present=(True, True)):
    return {"near_object": np.array(distances), "_near_object": np.array(present)}


def test_min_and_last_distance_per_episode_with_the_done_step_from_final_info():
    steps = [
        ([False, False], [False, False], _info([0.30, 0.20])),
        ([False, False], [False, False], _info([0.10, 0.25])),
        # env 0 reaches the goal and terminates: its step info (0.04) is under final_info, the
        # top-level info is the reset's (no distance for env 0).
        ([True, False], [False, False], {**_info([0.0, 0.22], present=(False, True)),
                                          "final_info": _info([0.04, 0.0], present=(True, False))}),
        ([False, False], [False, True], {**_info([0.35, 0.0], present=(True, False)),
                                          "final_info": _info([0.0, 0.15], present=(False, True))}),
    ]
    recorder = diagnosis.DistanceRecorder(FakeVectorEnv(steps))
    for _ in steps:
        recorder.step(None)
    assert recorder.episodes[0] == [(0.04, 0.04)]
    assert recorder.episodes[1] == [(0.15, 0.15)]
    # env 0's next episode started fresh (0.35 so far, not yet finished)
    assert recorder._min[0] == 0.35 and np.isinf(recorder._min[1])
