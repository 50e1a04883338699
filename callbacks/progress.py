"""A TQDM progress bar: env steps/s, the latest post-adaptation success and return, the last evaluation."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# Keys the module logs with prog_bar=True, and how they read on the bar.
_LABELS = {
    "steps_per_s": "env steps/s",
    "post_success": "post-adapt success",
    "post_return": "post-adapt return",
    "eval_success": "eval success",
}


def human_rate(value: float) -> str:
    """``16800.0 -> '16.8k'``: three significant digits with an SI suffix."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def format_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rename and format the module's progress-bar metrics; drop Lightning's ``v_num`` (an MLflow run id)."""
    shown: dict[str, Any] = {}
    for key, value in metrics.items():
        if key == "v_num":
            continue
        if key == "steps_per_s":
            shown[_LABELS[key]] = human_rate(float(value))
        elif key in _LABELS:
            shown[_LABELS[key]] = f"{float(value):.2f}"
        else:
            shown[key] = value
    return shown


class MetaRLProgressBar(TQDMProgressBar):
    """TQDM bar with ``env steps/s=16.8k, post-adapt success=0.42, post-adapt return=-41.23, eval success=0.62``.

    Args:
        refresh_rate: update the bar every this many batches (meta-iterations).
        leave: keep finished epochs' bars on screen.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Lightning's metrics, formatted by :func:`format_metrics`."""
        return format_metrics(super().get_metrics(trainer, pl_module))
