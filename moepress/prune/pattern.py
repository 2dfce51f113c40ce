"""Which weights a pruning pattern keeps: validation and the kept count per output row.

Two patterns, both applied to every output row on its own (a row is one output neuron, whose
weights all feed the same activation; comparing weights across rows would let a row with large
weights starve another of all its inputs):

- unstructured at a fraction `sparsity`: every row drops exactly round(in * sparsity) weights;
- N:M semi-structured: in every group of m consecutive input columns, n weights are kept
  (2:4 is what sparse tensor cores run).

Both keep the same count in every row, so the kept values of a matrix form a rectangle
[out, k] and can be stored without per-row offsets (see `sparse.py`).
"""

from __future__ import annotations

import math


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_pattern(sparsity: float | None, n: int | None, m: int | None, in_features: int, name: str) -> None:
    """Raise ValueError (one line naming `name`, saying what to do) unless the pattern is usable.

    Checked once at the edge so that a bad value fails before a Cholesky runs, not inside it.
    """
    structured = n is not None or m is not None
    if sparsity is not None and structured:
        raise ValueError(f"{name}: give either a sparsity or an N:M pattern, not both")
    if sparsity is None and not structured:
        raise ValueError(f"{name}: give a sparsity in (0, 1), e.g. 0.5, or an N:M pattern, e.g. n=2, m=4")
    if not _is_int(in_features) or in_features <= 0:
        raise ValueError(f"{name} has an empty input dimension ({in_features!r}); nothing to prune")
    if sparsity is not None:
        _check_sparsity(sparsity, in_features, name)
    else:
        _check_n_m(n, m, in_features, name)


def _check_sparsity(sparsity, in_features: int, name: str) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"{name}: sparsity must be a number in (0, 1), e.g. 0.5 (got {sparsity!r})")
    if not 0 < sparsity < 1:
        raise ValueError(
            f"{name}: sparsity must lie strictly between 0 and 1 (got {sparsity!r}); "
            "0 prunes nothing and 1 would remove every weight"
        )
    pruned = round(in_features * sparsity)
    if pruned == 0:
        raise ValueError(
            f"{name}: sparsity {sparsity!r} prunes no weight of a row of {in_features} inputs; "
            f"use at least {1 / in_features:.3g} or leave {name} dense"
        )
    if pruned == in_features:
        raise ValueError(
            f"{name}: sparsity {sparsity!r} keeps no weight of a row of {in_features} inputs; "
            f"use at most {1 - 1 / in_features:.3g}"
        )


def _check_n_m(n, m, in_features: int, name: str) -> None:
    if not _is_int(n) or not _is_int(m):
        raise ValueError(f"{name}: an N:M pattern needs integers n and m, e.g. n=2, m=4 (got n={n!r}, m={m!r})")
    if m < 2:
        raise ValueError(f"{name}: N:M needs m >= 2, e.g. 2:4 or 4:8 (got m={m})")
    if not 0 < n < m:
        raise ValueError(f"{name}: N:M needs 0 < n < m: n weights are kept of every m (got {n}:{m})")
    if in_features % m != 0:
        raise ValueError(
            f"{name}: m={m} does not divide the input dimension {in_features}; "
            "use an m that divides it (4 or 8 usually do) or unstructured sparsity"
        )


def kept_per_row(in_features: int, sparsity: float | None = None, n: int | None = None, m: int | None = None) -> int:
    """Weights every output row keeps: in - round(in * sparsity), or in // m * n for N:M.

    Assumes a pattern `check_pattern` accepted.
    """
    if sparsity is not None:
        return in_features - round(in_features * sparsity)
    return in_features // m * n


def pruned_per_row(in_features: int, sparsity: float | None = None, n: int | None = None, m: int | None = None) -> int:
    """Weights every output row drops (the complement of `kept_per_row`)."""
    return in_features - kept_per_row(in_features, sparsity, n, m)
