"""Trials: runs of consecutive episodes of one task with the recurrent state carried across them.

Pure tensor functions over ``[..., T]`` flags (``resets``: the state is zeroed before step ``t``;
``terminated`` / ``truncated``: the episode ended at ``t``), shared by the collector, the returns
and the evaluation adapter.
"""

from __future__ import annotations

import torch


def trial_ends(resets: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` bool: step ``t`` is the last of its trial (the state resets before ``t + 1``, or
    the rollout ends at ``t``)."""
    return torch.cat([resets[..., 1:], torch.ones_like(resets[..., :1])], dim=-1)


def value_boundaries(
    terminated: torch.Tensor, truncated: torch.Tensor, resets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Episode ends that also end the return: those where the recurrent state resets after them.

    With ``reset_state_on: episode`` the state resets after every episode end, so these are the
    episode ends themselves. Inside a trial (``trial``) an episode end is not an end of the return:
    what the agent does in episode 1 (explore) pays off in episode 2, as RL^2 optimises the return
    of the whole trial, and the value of the next episode's first step (same memory) follows.

    Args:
        terminated, truncated: ``[..., T]`` bool, the episode ended at ``t``.
        resets: ``[..., T]`` bool, the state was zeroed before step ``t``.

    Returns:
        ``(terminated & trial_end, truncated & trial_end)``.
    """
    ends = trial_ends(resets)
    return terminated & ends, truncated & ends


def trial_episode_returns(
    rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor, resets: torch.Tensor
) -> torch.Tensor:
    """Mean undiscounted return of the ``i``-th episode of a trial, for every ``i``: ``[n]``.

    What in-context adaptation shows: later episodes of a trial doing better than the first. Only
    finished episodes count; an index that no episode finished gets NaN. With ``reset_state_on:
    episode`` every episode is a trial of one (``n == 1``).

    Args:
        rewards: ``[..., T]``.
        terminated, truncated: ``[..., T]`` bool, the episode ended at ``t``.
        resets: ``[..., T]`` bool, a trial starts at ``t`` (``resets[..., 0]`` must be true).
    """
    ends = terminated | truncated
    index = torch.empty(ends.shape, dtype=torch.long, device=ends.device)
    running = torch.zeros(ends.shape[:-1], dtype=torch.long, device=ends.device)
    for t in range(ends.shape[-1]):
        running = torch.where(resets[..., t], torch.zeros_like(running), running)
        index[..., t] = running
        running = running + ends[..., t].long()
    # A step belongs to a finished episode when an episode end follows it before the next start,
    # i.e. some end at or after t (episodes change only at ends).
    finished = ends.flip(-1).long().cummax(-1).values.flip(-1).bool()
    one_hot = torch.nn.functional.one_hot(index, int(index.max()) + 1).to(rewards.dtype)  # (..., T, n)
    totals = (rewards * finished).unsqueeze(-1).mul(one_hot).flatten(0, -2).sum(0)  # (n,)
    counts = ends.to(rewards.dtype).unsqueeze(-1).mul(one_hot).flatten(0, -2).sum(0)  # (n,)
    return totals / counts  # 0 / 0 = NaN where no episode of that index finished
