"""Number of unique prototypes: the partial-prototype-collapse diagnostic.

Definition 2.1 of "Why Prototypes Collapse" (Arteaga et al., ICLR 2026) covers the ``K``
prototypes ``c_1, ..., c_K`` with groups, each with a representative. Every member ``c_j``
of a group lies within cosine distance ``1 - <c_i, c_j> / (||c_i|| ||c_j||) < eps`` of
the group's representative ``c_i``. The number of groups is the number of unique
prototypes: ``K`` means no collapse, ``1`` means total collapse.

The cover used here is the deterministic greedy scan:

1. L2-normalise the rows.
2. Visit the rows in index order. A row that no earlier representative covers becomes a
   representative and covers every later row ``j`` with ``1 - <c_i, c_j> < eps``.
3. The count is the number of representatives.

Equivalently, row ``i`` is a representative iff no earlier representative lies within
``eps`` of it. The representatives are therefore pairwise at least ``eps`` apart and every
other row is within ``eps`` of an earlier representative; these two facts determine the
result uniquely.

The count is not monotone in ``eps`` in general: a larger ``eps`` can let an early
representative swallow a row that, at a smaller ``eps``, would itself have covered
several others, which then become representatives of their own. For sets made of
well-separated clusters (every cluster's cosine diameter below ``eps``, every gap between
clusters above it) the count is the number of clusters, so nested clusterings give counts
that shrink as ``eps`` grows.

Cost: the scan is computed blockwise and never forms the ``K x K`` similarity matrix.
Every row meets every earlier representative (at any eps) once, through an int8 matrix
product of integer codes that bounds each pair's cosine from above and below
(:func:`_sketch`). The codes are taken in a basis led by the rows' principal directions:
``<x, y> <= <x_P, y_P> + |x_R| |y_R|`` for the leading ``r`` coordinates ``P`` and the
rest ``R`` (Cauchy-Schwarz), so each eps screens with a prefix of ``r`` codes and a few
columns holding ``|x_R|``, ``r`` chosen per eps from a sample of pairs: few for a tight
eps or a set with a decaying spectrum, about ``0.8 d`` for isotropic rows at eps = 0.5.
The pairs whose upper bound reaches ``1 - eps`` and whose lower bound does not pass it
are decided in float64, so the result is the float64 cover. Memory is ``O(K d)``; time
is ``O(K R r)`` int8 multiply-adds for ``R`` representatives, plus the candidate pairs
(about one per row and eps in a healthy set, tens in a dense cloud); no projection, pivot
or cluster bound spares a pair of isotropic rows entirely (they all sit near 90 degrees).
Timings: BENCHMARKS.md, section ``unique-count``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from protogmm._checks import check_in_range, check_matrix, check_positive_int

# The scan is in _cover_scan.py, its int8 sketch in _int8_sketch.py and its float64
# decisions in _pair_check.py; this module is the public API. Its functions find
# _representative_masks by this module's name (benchmarks/unique_count.py wraps it here),
# and the private names that tests and benchmarks read here are re-exported.
from protogmm.diagnostics._cover_scan import _REP_CHUNK as _REP_CHUNK
from protogmm.diagnostics._cover_scan import _representative_masks
from protogmm.diagnostics._int8_sketch import _int8_code_levels as _int8_code_levels
from protogmm.diagnostics._int8_sketch import _int8_matmul_is_exact as _int8_matmul_is_exact
from protogmm.diagnostics._int8_sketch import _sketch as _sketch

__all__ = [
    "DEFAULT_EPS",
    "data_reference_curve",
    "representatives",
    "unique_prototype_curve",
    "unique_prototypes",
]

DEFAULT_EPS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5)
"""Cosine-distance thresholds reported by default (0.025 is the paper's headline value)."""

_DEFAULT_BLOCK_SIZE = 1024


def unique_prototypes(
    prototypes: Tensor, eps: float = 0.025, *, block_size: int = _DEFAULT_BLOCK_SIZE
) -> int:
    """Count the unique prototypes at cosine-distance threshold ``eps`` (Definition 2.1).

    Args:
        prototypes: ``[K, d]`` floating-point tensor, one prototype per row, any device.
            Rows need not be normalised but must be finite and non-zero.
        eps: cosine-distance threshold in ``(0, 2]``; a row ``j`` joins the group of an
            earlier representative ``i`` when ``1 - cos(c_i, c_j) < eps``.
        block_size: rows processed per block; affects speed and memory, never the result.

    Returns:
        The number of groups (representatives) of the greedy index-order cover, in
        ``[1, K]``.

    Raises:
        ValueError: if ``prototypes`` is not a finite 2-D float tensor with at least one row,
            has an all-zero row, or ``eps`` is outside ``(0, 2]``.
    """
    eps = _check_eps("eps", eps)
    unit = _unit_rows_float64(prototypes)
    block_size = check_positive_int("block_size", block_size)
    return int(_representative_masks(unit, [eps], block_size)[0].sum())


def unique_prototype_curve(
    prototypes: Tensor,
    eps_values: Sequence[float] = DEFAULT_EPS,
    *,
    block_size: int = _DEFAULT_BLOCK_SIZE,
) -> dict[float, int]:
    """Count the unique prototypes at several thresholds in one pass.

    Equal to ``{eps: unique_prototypes(prototypes, eps) for eps in eps_values}``, but the
    normalisation, the block Gram matrices and the large representative-to-row similarity
    products are computed once and shared by all thresholds.

    Args:
        prototypes: ``[K, d]`` floating-point tensor, one prototype per row (see
            :func:`unique_prototypes`).
        eps_values: non-empty sequence of thresholds, each in ``(0, 2]``.
        block_size: rows processed per block; affects speed and memory, never the result.

    Returns:
        ``{eps: count}`` in the order of ``eps_values`` (repeated values appear once).

    Raises:
        ValueError: on bad ``prototypes`` (see :func:`unique_prototypes`), an empty
            ``eps_values`` or a threshold outside ``(0, 2]``.
    """
    if isinstance(eps_values, (int, float, str, bytes)) or not isinstance(eps_values, Sequence):
        raise ValueError(f"eps_values must be a sequence of floats, got {eps_values!r}")
    if len(eps_values) == 0:
        raise ValueError("eps_values must contain at least one threshold, got an empty sequence")
    checked = [_check_eps(f"eps_values[{i}]", eps) for i, eps in enumerate(eps_values)]
    unit = _unit_rows_float64(prototypes)
    block_size = check_positive_int("block_size", block_size)
    distinct = sorted(set(checked))
    counts = _representative_masks(unit, distinct, block_size).sum(dim=1).tolist()
    by_eps = dict(zip(distinct, counts, strict=True))
    return {eps: int(by_eps[eps]) for eps in checked}


def data_reference_curve(
    embeddings: Tensor,
    num_prototypes: int,
    eps_values: Sequence[float] = DEFAULT_EPS,
    *,
    seed: int = 0,
) -> tuple[dict[float, int], int]:
    """Definition 2.1 over ``K`` embeddings of the data drawn at random: the reference for
    prototypes that lie on the data.

    A prototype set fitted to the data (the mixture's means) cannot be much more spread
    than the data itself: when the embeddings fill only a cap of the sphere, ``K`` random
    embeddings already count few unique at a coarse ``eps``, and so does any ``K`` points
    on them. Learned (joint) prototypes need not lie on the data (an unused one stays
    where it was initialised), so they can count more. Compare a set's curve with this one.

    Args:
        embeddings: ``[N, d]`` embeddings (e.g. the teacher's, L2-normalised or not).
        num_prototypes: ``K``, how many rows to draw (all ``N`` when ``N <= K``).
        eps_values: the thresholds (see :func:`unique_prototype_curve`).
        seed: the draw's seed (without replacement; the global RNG is not touched).

    Returns:
        ``({eps: count}, n)`` with ``n = min(K, N)`` the rows drawn.

    Raises:
        ValueError: on bad ``embeddings`` or thresholds (see :func:`unique_prototype_curve`)
            or ``num_prototypes < 1``.
    """
    check_positive_int("num_prototypes", num_prototypes)
    check_matrix("embeddings", embeddings)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(embeddings.shape[0], generator=generator)[:num_prototypes]
    rows = embeddings[drawn.to(embeddings.device)]
    return unique_prototype_curve(rows, eps_values), rows.shape[0]


def representatives(
    prototypes: Tensor, eps: float = 0.025, *, block_size: int = _DEFAULT_BLOCK_SIZE
) -> Tensor:
    """Return the indices of the representatives of the greedy cover (Definition 2.1).

    Args:
        prototypes: ``[K, d]`` floating-point tensor (see :func:`unique_prototypes`).
        eps: cosine-distance threshold in ``(0, 2]``.
        block_size: rows processed per block; affects speed and memory, never the result.

    Returns:
        Increasing ``int64`` CPU tensor of row indices; its length is
        ``unique_prototypes(prototypes, eps)``. Index 0 is always included.
    """
    eps = _check_eps("eps", eps)
    unit = _unit_rows_float64(prototypes)
    block_size = check_positive_int("block_size", block_size)
    return _representative_masks(unit, [eps], block_size)[0].nonzero().flatten()


def _check_eps(name: str, eps: float) -> float:
    return check_in_range(name, eps, 0.0, 2.0, low_inclusive=False, high_inclusive=True)


def _unit_rows_float64(prototypes: Tensor) -> Tensor:
    """Validate ``prototypes`` and return its rows L2-normalised, as CPU float64."""
    check_matrix("prototypes", prototypes, min_rows=1, finite=False)
    rows = prototypes.detach().to(device="cpu", dtype=torch.float64)
    # Divide by the largest entry first so that squaring cannot overflow or underflow
    # (float64 rows near 1e200 or 1e-200 would otherwise get an inf or zero norm).
    largest = torch.linalg.vector_norm(rows, ord=math.inf, dim=1, keepdim=True)
    # A NaN or Inf entry makes its row's largest entry NaN or Inf: one pass finds both,
    # and the full check then names the row.
    if not bool(torch.isfinite(largest).all()):
        check_matrix("prototypes", prototypes, min_rows=1, finite=True)
    zero_rows = (largest == 0).flatten()
    if bool(zero_rows.any()):
        row = int(zero_rows.nonzero()[0, 0])
        raise ValueError(
            f"prototypes row {row} is all zeros (norm 0), so its direction is undefined"
        )
    # In place on the float64 copy (the same arithmetic, without two more K x d buffers).
    if rows.data_ptr() == prototypes.data_ptr():
        rows = rows.clone()
    rows /= largest
    rows /= torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows
