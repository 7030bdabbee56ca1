"""The rotation of the Definition 2.1 sketch, and how many of its coordinates each eps uses.

The unique-prototype count (:mod:`protogmm.diagnostics.uniqueness`, Definition 2.1 of
"Why Prototypes Collapse", Arteaga et al., ICLR 2026) bounds the cosine of every pair of
rows it meets. In an orthonormal basis whose leading directions carry most of the rows'
energy (their principal directions), ``<x, y> <= <x_P, y_P> + |x_R| |y_R|`` with ``x_P``
the leading ``r`` coordinates and ``x_R`` the rest: ``r + 1`` numbers per row bound the
cosine, and a pair can only be within eps if that bound reaches ``1 - eps``
(:mod:`protogmm.diagnostics._int8_sketch` quantises them). The bound holds for *any*
orthonormal basis; the principal directions only make it tight with a small ``r``. Each
eps gets its own ``r`` (:func:`_choose_prefixes`): a loose threshold needs more
coordinates than a tight one, and a set with a decaying spectrum far fewer than an
isotropic one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Seed of the fixed random rotations inside blocks of principal directions: any value gives
# the same result (only the sketch's tightness depends on it).
_SEED = 20260
# The leading principal directions are spread together by one random rotation, later ones
# in blocks of _BLOCK: the spreading evens out the coordinates of a row dominated by one
# direction (one quantisation step then suits every row), and the prefix lengths the
# screen can use are the block boundaries.
_FIRST_BLOCK = 64
_BLOCK = 16
# Rows the principal directions are estimated from (evenly spaced), and rows whose pairs
# estimate how many candidates each prefix length leaves: both only steer the speed.
_PCA_ROWS = 16384
_SAMPLE_ROWS = 1024
# The cost of one candidate pair (listing it, deciding it in float), in units of one int8
# multiply-add of every pair: about 0.3 us against 2.5 ps on two AVX-512 VNNI cores; and
# of listing the candidates of a tile (a block against a chunk of _TILE_PAIRS pairs) that
# has any: about 0.3 ms against 4.5 us per column of its product.
_CANDIDATE_COST = 1.2e5
_TILE_COST = 70.0
_TILE_PAIRS = 1024 * 2048


def _prefix_grid(dim: int) -> list[int]:
    """The prefix lengths the screen may use: block boundaries, and ``dim`` itself."""
    if dim % _BLOCK or dim <= _FIRST_BLOCK:
        return [dim]
    return list(range(_FIRST_BLOCK, dim + 1, _BLOCK))


def _rotation(unit: Tensor) -> tuple[Tensor, float]:
    """An orthonormal basis led by the rows' principal directions, randomly spread in blocks.

    Args:
        unit: ``[K, d]`` CPU float64 tensor with unit-norm rows.

    Returns:
        ``(rotation, defect)``: the ``[d, d]`` float32 matrix ``O`` whose columns are the
        basis (the matrix the coordinates are computed with) and a bound on
        ``||I - O O^T||_2``, so that ``|<x, y> - <x O, y O>| <= defect`` for unit ``x, y``.
    """
    num_rows, dim = unit.shape
    sample = unit[:: max(1, num_rows // _PCA_ROWS)].to(torch.float32)
    moments = (sample.T @ sample).to(torch.float64)
    _, vectors = torch.linalg.eigh(moments)
    principal = vectors.flip(1)  # descending eigenvalues
    generator = torch.Generator().manual_seed(_SEED)
    sizes = [min(_FIRST_BLOCK, dim)]
    while sum(sizes) < dim:
        sizes.append(min(_BLOCK, dim - sum(sizes)))
    blocks = [
        torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
        for n in sizes
    ]
    rotation = (principal @ torch.block_diag(*blocks)).to(torch.float32)
    # The float32 rounding leaves O slightly non-orthogonal: bound that exactly (the
    # float64 product and norm err by far less than the 1e-12 added).
    exact = rotation.to(torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    defect = float(torch.linalg.matrix_norm(eye - exact @ exact.T)) + 1e-12
    return rotation, defect


def _coordinate_error(dim: int, exact_float32: bool, rotation: Tensor) -> float:
    """Bound on each coordinate's error in ``fl(fl(x) O)`` against ``x O``, for unit ``x``.

    Entry k is off by at most ``(u + gamma_d) sum_l |x_l| |O_lk| <= (d + 2) u |O_k|`` for
    unit x (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5; the
    rounding of x itself is the u; underflow far smaller). Doubled.
    """
    unit_roundoff = 2.0**-24 if exact_float32 else 2.0**-53
    column = float(torch.linalg.vector_norm(rotation.to(torch.float64), dim=0).max())
    return 2.0 * (dim + 2) * unit_roundoff * column


def _choose_prefixes(
    sample_codes: Tensor,
    scale: float,
    candidates: list[tuple[int, int, Tensor, Tensor]],
    thresholds: list[float],
) -> list[int]:
    """For each threshold, the prefix (index into ``candidates``) with the least est. cost.

    The cost of a prefix is its product width, plus ``_CANDIDATE_COST`` per candidate pair
    and ``_TILE_COST`` per tile with a candidate, estimated from the sample pairs whose
    upper bound reaches the threshold. Speed only: any choice is exact.

    Args:
        sample_codes: ``[S, d]`` codes of the sample rows.
        scale: factor from a code product to an approximate cosine.
        candidates: per prefix: ``(length, width, residual codes * sqrt(copies) [S],
            bound [S])`` of the sample rows.
        thresholds: the least cosines ``1 - eps`` to screen for.

    Returns:
        One index into ``candidates`` per threshold.
    """
    size = sample_codes.shape[0]
    # Float32 holds these integer products exactly (|sum| < 2**24 for d <= 1024), and a
    # rounded bound only steers the choice.
    codes = sample_codes.to(torch.float32)
    costs: list[list[float]] = []
    products = torch.zeros(size, size, dtype=torch.float32)
    done = 0
    for length, width, residual, bound in candidates:
        products.addmm_(codes[:, done:length], codes[:, done:length].T)
        done = length
        upper = torch.addr(products, residual.float(), residual.float()).mul_(scale)
        upper += bound.float()[None, :]
        upper.diagonal().fill_(-math.inf)  # a row with itself is no pair
        row = []
        for t in thresholds:
            fraction = int(torch.count_nonzero(upper >= t)) / (size * (size - 1))
            tiles = min(1.0, fraction * _TILE_PAIRS)
            row.append(width + _CANDIDATE_COST * fraction + _TILE_COST * tiles)
        costs.append(row)
        if all(cost == width for cost in row):
            break  # no candidate left: longer prefixes only cost more
    return [min(range(len(costs)), key=lambda g: costs[g][e]) for e in range(len(thresholds))]


def _sample_rows(num_rows: int) -> Tensor:
    """Evenly spaced row indices: at most ``_SAMPLE_ROWS``, and an eighth of the rows."""
    size = min(num_rows, _SAMPLE_ROWS, max(64, num_rows // 8))
    return torch.linspace(0, num_rows - 1, size).round().long().unique()
