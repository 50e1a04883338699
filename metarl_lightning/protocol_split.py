"""Which goals a protocol result was run on: the held-out split (meta-test) or the training one.

``MetaWorldEvaluation(split="train")`` runs the official protocol on the training classes and goals
(the Meta-World paper's meta-train column). Its results carry ``counts["split"] == "train"`` and are
logged as ``eval_train/...``, so that no consumer (checkpoint monitors, ``results.json`` readers, the
curves, the end-of-run summary) can take a meta-train number for the meta-test one.
"""

from __future__ import annotations

from typing import Any


def is_train_split(entry: dict[str, Any]) -> bool:
    """Whether a protocol result (or a ``results.json`` protocol entry) was run on the training goals."""
    return (entry.get("counts") or {}).get("split") == "train"


def metric_prefix(counts: dict[str, Any]) -> str:
    """``eval`` for the held-out split, ``eval_train`` for the protocol on the training goals."""
    return "eval_train" if counts.get("split") == "train" else "eval"
