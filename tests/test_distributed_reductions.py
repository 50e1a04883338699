"""The gradient all-reduce of :mod:`metarl_lightning.distributed` on two gloo ranks, against the
average computed by hand (tests/test_distributed.py checks the same path end to end through DDP)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metarl_lightning.distributed import all_reduce_gradients, mean_over_ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grads(rank: int) -> dict[str, torch.Tensor | None]:
    """What each rank's backward left: ``both`` reached on both ranks, ``one`` on rank 0 only,
    ``none`` on neither (a critic that is never run)."""
    return {
        "both": torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * (rank + 1),
        "one": torch.tensor([6.0, -2.0]) if rank == 0 else None,
        "none": None,
    }


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = {}
        for name, grad in _rank_grads(rank).items():
            shape = (2, 2) if name == "both" else (2,)
            params[name] = torch.nn.Parameter(torch.zeros(shape))
            params[name].grad = grad
        frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
        all_reduce_gradients([*params.values(), frozen], world_size=2)
        mean = mean_over_ranks(torch.tensor([float(rank)]), world_size=2)
        torch.save({"grads": {n: p.grad for n, p in params.items()}, "mean": mean}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_all_reduce_gradients_averages_over_ranks_and_keeps_unreached_none(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = {
        "both": (_rank_grads(0)["both"] + _rank_grads(1)["both"]) / 2,
        "one": _rank_grads(0)["one"] / 2,  # averaged with rank 1's zeros, not left out
        "none": None,
    }
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["mean"].item() == pytest.approx(0.5)
        for name, want in expected.items():
            got = result["grads"][name]
            if want is None:
                assert got is None, f"rank {rank}: {name} got a grad no rank computed"
            else:
                torch.testing.assert_close(got, want)


def test_one_process_is_the_identity():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    all_reduce_gradients([p], world_size=1)
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 2.0]))
    t = torch.tensor([3.0])
    assert mean_over_ranks(t, world_size=1) is t
