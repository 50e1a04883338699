"""Rotation matrix -> quaternion, a scalar port of scipy's ``Rotation.from_matrix(m).as_quat()``.

Meta-World builds the object quaternion of 22 of its 50 v3 observations with
``scipy.spatial.transform.Rotation.from_matrix(xmat).as_quat()``: ~90 us per call for one 3x3 matrix,
16-31% of a step. For a matrix that scipy accepts unchanged (orthonormal, positive determinant)
scipy's answer is the branch-on-largest-diagonal algorithm below followed by a normalisation; done
with Python floats in the same operation order it is bit-identical (checked against scipy on 100k
random rotations in ``tests/test_fast_envs.py``) and ~15x faster.

Any matrix that scipy would treat specially (not orthonormal -> SVD projection, determinant <= 0 ->
ValueError, NaN) is not handled here: :func:`quat_from_xmat` returns ``None`` and the caller hands
the matrix back to the stock scipy code, so results and errors there stay scipy's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# scipy accepts a matrix unchanged when every entry of M @ M.T is within 1e-12 of the identity.
# Ours is ten times tighter, so anything near scipy's threshold goes to scipy, never to us.
_ORTHONORMAL_TOL = 1e-13
# A rotation's determinant is 1; anything this far below is not one (scipy raises at <= 0).
_MIN_DET = 0.5


def quat_from_xmat(m: Sequence[float]) -> np.ndarray | None:
    """The scalar-last unit quaternion of a flat row-major 3x3 rotation matrix, or ``None``.

    Args:
        m: 9 floats, row-major (MuJoCo's ``xmat`` layout), e.g. ``data.geom_xmat[i].tolist()``.

    Returns:
        ``(x, y, z, w)`` as a float64 array of shape (4,), equal bit for bit to
        ``Rotation.from_matrix(np.reshape(m, (3, 3))).as_quat()``; ``None`` when the matrix is not
        a clean rotation (NaN/inf, not orthonormal to 1e-13, determinant below 0.5): the caller
        must then use scipy, which projects or raises.
    """
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    # Orthonormality via the Gram matrix rows; NaN makes every comparison False -> hand back.
    g00 = m00 * m00 + m01 * m01 + m02 * m02
    g11 = m10 * m10 + m11 * m11 + m12 * m12
    g22 = m20 * m20 + m21 * m21 + m22 * m22
    g01 = m00 * m10 + m01 * m11 + m02 * m12
    g02 = m00 * m20 + m01 * m21 + m02 * m22
    g12 = m10 * m20 + m11 * m21 + m12 * m22
    tol = _ORTHONORMAL_TOL
    if not (
        abs(g00 - 1.0) <= tol
        and abs(g11 - 1.0) <= tol
        and abs(g22 - 1.0) <= tol
        and abs(g01) <= tol
        and abs(g02) <= tol
        and abs(g12) <= tol
    ):
        return None
    det = m00 * (m11 * m22 - m12 * m21) - m01 * (m10 * m22 - m12 * m20) + m02 * (m10 * m21 - m11 * m20)
    if not det > _MIN_DET:
        return None

    trace = m00 + m11 + m22
    # scipy takes argmax over (m00, m11, m22, trace): the first maximum wins ties, as here.
    choice, best = 0, m00
    if m11 > best:
        choice, best = 1, m11
    if m22 > best:
        choice, best = 2, m22
    if trace > best:
        choice = 3

    if choice == 0:
        q0 = 1.0 - trace + 2.0 * m00
        q1 = m10 + m01
        q2 = m20 + m02
        q3 = m21 - m12
    elif choice == 1:
        q1 = 1.0 - trace + 2.0 * m11
        q2 = m21 + m12
        q0 = m01 + m10
        q3 = m02 - m20
    elif choice == 2:
        q2 = 1.0 - trace + 2.0 * m22
        q0 = m02 + m20
        q1 = m12 + m21
        q3 = m10 - m01
    else:
        q0 = m21 - m12
        q1 = m02 - m20
        q2 = m10 - m01
        q3 = 1.0 + trace

    norm = math.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3)
    return np.array((q0 / norm, q1 / norm, q2 / norm, q3 / norm))
