"""DDP on CPU (gloo): the 2-rank second-order meta-gradient equals the 1-process one.

Tasks and exploration noise are drawn for the global meta-batch and sharded by rank, so the two
runs see the same experience; only the summation order of the gradient differs.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")
ROOT = SCRIPT.parents[1]


def run(out: Path, devices: int, strategy: str = "ddp", *extra: str) -> None:
    out.mkdir()
    command = [sys.executable, str(SCRIPT), str(out), str(devices), strategy, *extra]
    subprocess.run(command, cwd=ROOT, check=True, timeout=600, capture_output=True)


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k] is not None)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "single"
    run(out, 1)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_ranks_match_one_process(single, tmp_path, strategy):
    out = tmp_path / strategy
    run(out, 2, strategy)
    one_grad = torch.load(single / "grads_rank0.pt")
    rank_grads = [torch.load(out / f"grads_rank{r}.pt") for r in (0, 1)]
    scale = max(g.abs().max().item() for g in one_grad.values())
    assert scale > 1e-3, "the meta-gradient should not be trivially zero"
    # every rank steps with the same averaged gradient, equal to the single-process one
    assert max_abs_diff(rank_grads[0], rank_grads[1]) == 0.0
    assert max_abs_diff(one_grad, rank_grads[0]) < 1e-5 * scale
    # ... so after several meta-steps the parameters are identical on both ranks and match
    params = [torch.load(out / f"params_rank{r}.pt") for r in (0, 1)]
    assert max_abs_diff(params[0], params[1]) == 0.0
    assert max_abs_diff(torch.load(single / "params_rank0.pt"), params[0]) < 1e-5


def test_a_parameter_no_loss_reaches_keeps_no_grad_under_ddp(tmp_path):
    """Linear baseline, ``value_coef: 0``, weight decay: the critic is never run, so its grads are
    None on one process; DDP must keep them None (a zero grad would be weight-decayed by AdamW and
    the ranks' critic would drift from the single process's)."""
    run(tmp_path / "single", 1, "ddp", "linear")
    run(tmp_path / "ddp", 2, "ddp", "linear")
    one_grad = torch.load(tmp_path / "single" / "grads_rank0.pt")
    rank_grad = torch.load(tmp_path / "ddp" / "grads_rank0.pt")
    unused = {n for n, g in one_grad.items() if g is None}
    assert unused and all(n.startswith("value_head") or "critic" in n for n in unused), unused
    assert {n for n, g in rank_grad.items() if g is None} == unused
    assert max_abs_diff(one_grad, rank_grad) < 1e-5 * max(g.abs().max().item() for g in rank_grad.values() if g is not None)
    single_params, rank_params = (torch.load(tmp_path / d / "params_rank0.pt") for d in ("single", "ddp"))
    assert max_abs_diff(single_params, rank_params) < 1e-5


def test_observation_statistics_are_those_of_all_ranks(tmp_path):
    """Every rank folds in the observations of all ranks: the statistics are identical on both ranks
    and equal to the one-process run's (the same experience, summed in another order, up to the
    float rounding of the parameters that acted), and so the parameters trained on the standardised
    inputs match too."""
    run(tmp_path / "single", 1, "ddp", "normalized")
    run(tmp_path / "ddp", 2, "ddp", "normalized")
    single = torch.load(tmp_path / "single" / "obs_stats_rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"obs_stats_rank{r}.pt") for r in (0, 1)]
    assert single["count"] == 3 * 2 * 8 * 4 * 50  # iterations x (support, query) x tasks x envs x steps
    assert ranks[0]["count"] == single["count"]  # each rank's own half would be half the count
    for key in ("count", "mean", "var"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        # The parameters differ by float rounding (< 1e-5), so the later observations do slightly.
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-8)
    single_params, rank_params = (torch.load(tmp_path / d / "params_rank0.pt") for d in ("single", "ddp"))
    assert max_abs_diff(single_params, rank_params) < 1e-5
