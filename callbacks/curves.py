"""``training_curves.png`` from a ``results.json`` payload (see :mod:`callbacks.results`)."""

from __future__ import annotations

from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.atomic_io import write_atomic
from metarl_lightning.protocol_split import is_train_split

STEPS = "env steps (millions)"


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(env steps in millions, values)`` of the entries that have ``key``."""
    points = [(e.get("env_steps", 0) / 1e6, e[key]) for e in entries if e.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(results: dict[str, Any], path: str) -> None:
    """Three panels against env steps: returns (train and eval, pre/post adaptation), success rates
    (the official protocol's in black, on the training goals in purple), meta-loss.

    Drawn on a bare :class:`Figure` (no pyplot): no global state, no display needed. Written atomically.
    """
    train, evaluation = results.get("train", []), results.get("eval", [])
    figure = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    returns, success, loss = figure.subplots(1, 3)

    for key, style, label in (("pre_adaptation_return", "--", "train pre"), ("post_adaptation_return", "-", "train post")):
        returns.plot(*_series(train, key), style, color="tab:blue", label=label)
    for key, marker, label in (("pre_adaptation_return", "s", "eval pre"), ("post_adaptation_return", "o", "eval post")):
        returns.plot(*_series(evaluation, key), marker=marker, linestyle=":", color="tab:orange", label=label)
    returns.set(title="Return (pre/post adaptation)", xlabel=STEPS, ylabel="mean episode return")

    for key, marker, label in (("pre_adaptation_success", "s", "eval pre"), ("post_adaptation_success", "o", "eval post")):
        success.plot(*_series(evaluation, key), marker=marker, color="tab:green", linestyle="--" if "pre" in key else "-", label=label)
    for key, style, label in (("post_adaptation_success", "-", "train post"),):
        success.plot(*_series(train, key), style, color="tab:gray", alpha=0.6, label=label)
    entries = results.get("protocol", [])
    for protocol, color, goals in (([e for e in entries if not is_train_split(e)], "black", ""),
                                   ([e for e in entries if is_train_split(e)], "tab:purple", ", training goals")):
        if protocol:
            name = protocol[-1].get("counts", {}).get("protocol", "")
            success.plot(*_series(protocol, "success_rate"), marker="D", color=color, label=f"metaworld eval ({name}{goals})")
    success.set(title="Success rate", xlabel=STEPS, ylabel="fraction of episodes", ylim=(-0.05, 1.05))

    loss.plot(*_series(train, "meta_loss"), color="tab:red", label="meta-loss")
    loss.set(title="Meta-loss (first PPO epoch)", xlabel=STEPS, ylabel="loss")

    for axes in (returns, success, loss):
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(loc="best", fontsize="small")
    config = results.get("config") or {}
    benchmark = (config.get("data") or {}).get("benchmark", "")
    figure.suptitle(f"{benchmark} - {results.get('epochs_completed', 0)} epochs, {results.get('env_steps', 0):,} env steps")
    write_atomic(path, lambda temporary: figure.savefig(temporary, format="png"))
