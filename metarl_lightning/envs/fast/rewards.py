"""Scalar versions of Meta-World's reward shaping helpers, bit-identical to ``metaworld.utils.reward_utils``.

The stock ``tolerance`` runs four ``np.where``/``np.logical_and`` calls on 0-d arrays to shape one
number (~7 us); here the same arithmetic is done on numpy scalars (~1 us). The numpy scalars are
deliberate: ``np.float64(v) ** 2`` goes through numpy's ``pow`` while a Python ``v * v`` is a plain
multiply, and the two may differ in the last bit, so every operation the stock code does on numpy
values is done on numpy values here too. Anything outside the common case (array input, an int, a
sigmoid other than ``long_tail``, a non-default ``value_at_margin``, invalid bounds or margins, where
the stock function raises) is passed to the stock function, so its results and errors are kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from metaworld.utils import reward_utils

# reward_utils._sigmoids computes this scale on every call for value_at_margin=0.1.
_VALUE_AT_MARGIN = reward_utils._DEFAULT_VALUE_AT_MARGIN
_LONG_TAIL_SCALE = np.sqrt(1 / _VALUE_AT_MARGIN - 1)
_SCALAR_TYPES = (float, np.float64)


def tolerance(
    x: Any,
    bounds: tuple[float, float] = (0.0, 0.0),
    margin: Any = 0.0,
    sigmoid: reward_utils.SIGMOID_TYPE = "gaussian",
    value_at_margin: float = _VALUE_AT_MARGIN,
) -> Any:
    """``reward_utils.tolerance`` with the same result, type and errors; fast for a scalar long-tail call.

    Args:
        x: the shaped quantity; a Python float or ``np.float64`` takes the fast path.
        bounds: inclusive ``(lower, upper)`` interval that scores 1.
        margin: distance outside ``bounds`` at which the score falls to ``value_at_margin``.
        sigmoid: the fall-off; only ``"long_tail"`` has a fast path.
        value_at_margin: score at ``margin`` from the bounds.

    Returns:
        A Python float for scalar ``x`` (as the stock ``.item()`` gives), else whatever the stock
        function returns.
    """
    lower, upper = bounds
    if (
        type(x) not in _SCALAR_TYPES
        or sigmoid != "long_tail"
        or value_at_margin != _VALUE_AT_MARGIN
        or not lower <= upper
        or not margin >= 0
    ):
        return reward_utils.tolerance(x, bounds, margin, sigmoid, value_at_margin)
    in_bounds = lower <= x and x <= upper
    if margin == 0:
        return 1.0 if in_bounds else 0.0
    if in_bounds:
        return 1.0
    # Stock: d = np.where(x < lower, lower - x, x - upper) / margin, a numpy scalar from here on.
    d = np.float64(lower - x if x < lower else x - upper) / margin
    return (1 / ((d * _LONG_TAIL_SCALE) ** 2 + 1)).item()


def norm(v: np.ndarray) -> np.float64:
    """``np.linalg.norm(v)`` of a 1-D float64 vector, same bits and type, without the wrapper.

    ``np.linalg.norm`` computes ``sqrt(v.dot(v))`` for this case; ``dot`` is kept (its summation
    order is BLAS's, not a Python loop's) and the square root is IEEE-exact either way.
    """
    return np.float64(math.sqrt(v.dot(v)))
