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
product of integer codes of the rows that bounds each pair's cosine (:func:`_sketch`); the
few pairs whose bound reaches a threshold (in a healthy set almost none; about one per
covered row in a collapsed one) are decided in float64, so the result is the float64
cover. Memory is ``O(K d)``; time is ``O(K R d)`` int8 multiply-adds for ``R``
representatives. ``R = K`` for a set with no collapse, the worst
case: every pair must then be bounded, and no projection, pivot or cluster bound can
spare a pair of isotropic rows (they all sit near 90 degrees). ``K = 65536``, ``d = 256``,
all five default thresholds, two idle CPU cores with AVX-512 VNNI: 1.8 s for random rows;
``K = 262144``: 27 s, of which the int8 products alone take about 21 s (BENCHMARKS.md,
section ``unique-count``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from protogmm._checks import check_in_range, check_matrix, check_positive_int

__all__ = ["DEFAULT_EPS", "representatives", "unique_prototype_curve", "unique_prototypes"]

DEFAULT_EPS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5)
"""Cosine-distance thresholds reported by default (0.025 is the paper's headline value)."""

_DEFAULT_BLOCK_SIZE = 1024
# Representatives multiplied against one block at a time: bounds the code-product tile to
# block_size x _REP_CHUNK int32 entries (8 MiB at the default block size). Larger tiles
# spill the last-level cache, and the int8 product then runs at a third of its speed.
_REP_CHUNK = 2048
# Columns of a tile reduced together when listing its candidate pairs (divides _REP_CHUNK).
_CELL = 128
# Codes of the float product fallback are integers in [-63, 63] (see _sketch).
_FLOAT_CODE_LEVELS = 63
# Below this dimension the int8 product gains little (and torch._int_mm mishandles d = 1);
# above the other, 127^2 d could overflow the int32 products.
_INT8_MIN_DIM = 16
_INT8_MAX_DIM = 65536
# The sketch rotates the rows only if some coordinate exceeds _SPIKY / sqrt(d), well above
# the largest coordinate of isotropic rows (about 6 / sqrt(d) for K d up to 1e9).
_SPIKY = 8.0
# Seed of the fixed signs of the spreading rotation: any value gives the same result.
_SPREAD_SEED = 20260
# Rows sketched at a time (bounds the float64 temporaries to 2 MiB for d = 256).
_SKETCH_CHUNK = 1024
# Pairs checked in float64 at a time (bounds the gathered rows).
_PAIR_CHUNK = 8192
# The float32 copy of the rows for the pair checks is made once more than K / this many
# pairs have needed a check (a healthy set never gets there).
_SINGLE_COPY_AFTER = 8
# Pairs filling more than 1 / _DENSE_FRACTION of a block's triangle are checked with one
# dense float64 product of the block.
_DENSE_FRACTION = 16


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
    check_matrix("prototypes", prototypes, min_rows=1, finite=True)
    rows = prototypes.detach().to(device="cpu", dtype=torch.float64)
    # Divide by the largest entry first so that squaring cannot overflow or underflow
    # (float64 rows near 1e200 or 1e-200 would otherwise get an inf or zero norm).
    largest = torch.linalg.vector_norm(rows, ord=math.inf, dim=1, keepdim=True)
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


@dataclass(frozen=True)
class _Sketch:
    """Integer codes of the unit rows and what their products bound (see :func:`_sketch`).

    For rows ``i`` and ``j`` with code product ``p_ij = <codes_i, codes_j>`` (an exact
    integer), ``|<c_i, c_j> - scale * p_ij| <= bound_j`` in float64, rounding included.

    Attributes:
        codes: ``[K, d]`` integer-valued codes, int8 when the int8 product is used.
        scale: float64 factor from a code product to an approximate cosine.
        bound: ``[K]`` float64 bound on the approximation error of any pair with row ``j``.
        int8: True when ``codes`` is int8 and products run through ``torch._int_mm``.
    """

    codes: Tensor
    scale: float
    bound: Tensor
    int8: bool

    @property
    def product_dtype(self) -> torch.dtype:
        """The dtype of :meth:`matmul`'s result."""
        return torch.int32 if self.int8 else self.codes.dtype

    def matmul(self, rows: Tensor, columns: Tensor) -> Tensor:
        """Exact code products ``rows @ columns.T`` (int32, or integer-valued float)."""
        if self.int8:
            return torch._int_mm(rows, columns.T)
        return rows @ columns.T


def _sketch(unit: Tensor) -> _Sketch:
    """Quantise the rows to small integer codes after a fixed orthogonal spreading.

    Each row ``a`` is rotated by ``M = diag(signs) kron(H, I)``, with ``H`` the Sylvester
    Hadamard matrix of the largest power of two ``P`` dividing ``d`` and fixed random signs,
    so that ``M M^T = M^T M = P I`` exactly and a row with one large coordinate is spread
    over ``P`` of them (one global quantisation step then suits every row); rows without
    such a coordinate keep ``M = I``, ``P = 1``. The codes are
    ``q = round(a M / step)`` with ``|q| <= L`` (``L`` = 127 or 63, see
    :func:`_int8_code_levels`). They stand for ``a~ = (step / P) q M^T``, for which
    ``<a~_i, a~_j> = step^2 / P <q_i, q_j>``, ``|a~| = step |q| / sqrt(P)`` and
    ``|a - a~| = |a M - step q| / sqrt(P)`` (``M / sqrt(P)`` is orthogonal). With
    ``a = a~ + r``, ``|<a_i, a_j> - <a~_i, a~_j>| <= |a~_i| |r_j| + |r_i| |a~_j| + |r_i| |r_j|``,
    bounded per row ``j`` by the largest ``|a~|`` and ``|r|`` over all rows. The rotation is
    computed in float32, and its rounding error is added to ``|r|``. How good the rotation
    is only changes how many pairs need the float64 check, never the result.

    Without a usable int8 product the codes stay within 63, so that every partial sum of
    a float32 product of codes is an integer below 2**24, hence exact.

    Args:
        unit: ``[K, d]`` CPU float64 tensor with unit-norm rows.

    Returns:
        The sketch; ``bound`` includes a slack far above every float64 rounding error.
    """
    num_rows, dim = unit.shape
    # The float32 error bound below assumes IEEE float32 products and sums; if the user
    # allowed reduced-precision float32 matmuls, rotate in float64 instead.
    exact_float32 = torch.get_float32_matmul_precision() == "highest"
    power = dim & -dim
    # Rows whose largest coordinate is already what isotropic rows have (no more than
    # _SPIKY / sqrt(d)) gain nothing from the rotation: skip it (M = I, P = 1, exact).
    peak = float(torch.linalg.vector_norm(unit, ord=math.inf))
    if power == 1 or peak * math.sqrt(dim) <= _SPIKY:
        power, spread, rotation_error = 1, unit, 0.0
    else:
        work_dtype = torch.float32 if exact_float32 else torch.float64
        rotation = _spreading_matrix(dim, power).to(work_dtype)
        spread = torch.empty(num_rows, dim, dtype=work_dtype)
        for start in range(0, num_rows, _SKETCH_CHUNK):
            torch.matmul(
                unit[start : start + _SKETCH_CHUNK].to(work_dtype),
                rotation,
                out=spread[start : start + _SKETCH_CHUNK],
            )
        # Entry k of a M is off by at most (u + gamma_d) sum_l |a_l| <= (u + gamma_d)
        # sqrt(d) for unit a (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
        # ed., eq. 3.5; the rounding of a itself is the u; an underflow below 2**-149 per
        # entry is far smaller), so |a M| by sqrt(d) times that. Doubled.
        unit_roundoff = 2.0**-24 if exact_float32 else 2.0**-53
        rotation_error = 2.0 * dim * (dim + 2) * unit_roundoff / math.sqrt(power)
    levels = _int8_code_levels() if _INT8_MIN_DIM <= dim <= _INT8_MAX_DIM else 0
    int8 = levels > 0
    if int8:
        code_dtype = torch.int8
    elif dim * _FLOAT_CODE_LEVELS**2 < 2**24 and exact_float32:
        levels, code_dtype = _FLOAT_CODE_LEVELS, torch.float32
    else:
        levels, code_dtype = _FLOAT_CODE_LEVELS, torch.float64
    if power > 1:
        peak = float(torch.linalg.vector_norm(spread, ord=math.inf))
    step = peak / levels
    codes = torch.empty(num_rows, dim, dtype=code_dtype)
    norms = torch.empty(num_rows, dtype=torch.float64)
    residuals = torch.empty(num_rows, dtype=torch.float64)
    for start in range(0, num_rows, _SKETCH_CHUNK):
        rows = spread[start : start + _SKETCH_CHUNK].to(torch.float64)
        stop = start + rows.shape[0]
        # Any integer vector would do as a code (the bound is computed from it); rounding
        # a M / step to the nearest one keeps the residual smallest.
        quantised = torch.mul(rows, 1.0 / step).round_().clamp_(-levels, levels)
        codes[start:stop] = quantised
        norms[start:stop] = torch.linalg.vector_norm(quantised, dim=1)
        # Out of place: without the rotation, ``rows`` is a view of ``unit`` itself.
        residuals[start:stop] = torch.linalg.vector_norm(
            torch.add(rows, quantised, alpha=-step), dim=1
        )
    norms *= step
    norms /= math.sqrt(power)
    residuals /= math.sqrt(power)
    residuals += rotation_error

    # Float64 rounding of the products, norms and the final ``1 - <c_i, c_j> < eps`` test
    # is below 4 d 2**-53 (unit rows); the slack covers it many times over.
    slack = 1e-6 + 4 * dim * 2.0**-53
    largest_norm, largest_residual = float(norms.amax()), float(residuals.amax())
    bound = largest_norm * residuals + largest_residual * (norms + residuals) + slack
    return _Sketch(codes=codes, scale=step * step / power, bound=bound, int8=int8)


def _spreading_matrix(dim: int, power: int) -> Tensor:
    """``diag(signs) kron(H_power, I_{dim / power})``: entries 0 and +-1, ``M M^T = power I``.

    ``H`` is the Sylvester Hadamard matrix; the signs are fixed (seeded) so that no
    ordinary row (e.g. constant) is mapped onto a coordinate axis.
    """
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < power:
        hadamard = torch.cat(
            [torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)]
        )
    generator = torch.Generator().manual_seed(_SPREAD_SEED)
    signs = torch.randint(0, 2, (dim,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(hadamard, torch.eye(dim // power, dtype=torch.float64))


@functools.cache
def _int8_code_levels() -> int:
    """The largest code magnitude for which ``torch._int_mm`` is exact here, or 0.

    ``torch._int_mm`` (oneDNN on x86) may shift the left operand to unsigned and, on CPUs
    without VNNI, add pairs of u8 x s8 products in int16 with saturation. Codes within 7
    bits (63) can never saturate that way; full 8-bit codes (127) halve the sketch's error
    bound but are tried only where the CPU has VNNI or AMX int8 (products accumulate
    straight into int32). Either way the codes must pass a check on extreme and random
    values, at the shapes the scan uses, against float64 (exact for these integers); if
    none passes (an old torch, a platform without the kernel) this returns 0 and the float
    product of the same codes is used instead, which is exact too.
    """
    for levels in (127, 63) if _cpu_has_int8_dot_product() else (63,):
        if _int8_matmul_is_exact(levels):
            return levels
    return 0


def _int8_matmul_is_exact(levels: int) -> bool:
    """Whether ``torch._int_mm`` gives exact products of codes in ``[-levels, levels]``."""
    generator = torch.Generator().manual_seed(_SPREAD_SEED)
    for rows, columns, dim in ((1, 5, 256), (67, 45, 300), (256, 512, 256)):
        left = torch.randint(-levels, levels + 1, (rows, dim), generator=generator)
        right = torch.randint(-levels, levels + 1, (columns, dim), generator=generator)
        # Rows and columns of one sign at the extremes: the sums a saturating kernel breaks.
        left[0], right[0], right[-1] = levels, levels, -levels
        try:
            product = torch._int_mm(left.to(torch.int8), right.to(torch.int8).T)
        except (AttributeError, RuntimeError, NotImplementedError):
            return False
        expected = left.to(torch.float64) @ right.to(torch.float64).T
        if not torch.equal(product.to(torch.float64), expected):
            return False
    return True


def _cpu_has_int8_dot_product() -> bool:
    """Whether the CPU lists an int8 dot-product extension (Linux x86 ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def _representative_masks(unit: Tensor, eps_values: list[float], block_size: int) -> Tensor:
    """Run the greedy index-order cover for every threshold at once.

    Rows are visited in blocks in index order. For each block, first every representative
    found in earlier blocks (all of which precede the block) marks the block rows it covers;
    then the block's still-uncovered rows are resolved sequentially among themselves. This
    gives exactly the row-by-row scan, because a row can only be covered by an earlier
    representative.

    Every comparison starts from the integer sketch (:func:`_sketch`): one int8 matrix
    product per tile bounds the cosine of every pair in it. Only pairs whose bound reaches
    ``1 - eps`` (rare in a healthy set) are looked at again, and decided by
    ``1 - <c_i, c_j> < eps`` in float64 (:class:`_PairCheck`); a pair whose bound stays
    below cannot pass that float64 test. The decisions, hence the cover, are therefore the
    float64 ones, whatever the sketch.

    Args:
        unit: ``[K, d]`` CPU float64 tensor with unit-norm rows.
        eps_values: thresholds in ``(0, 2]``.
        block_size: rows per block.

    Returns:
        ``[len(eps_values), K]`` bool tensor; entry ``[e, i]`` is True iff row ``i`` is a
        representative at ``eps_values[e]``.
    """
    num_rows, dim = unit.shape
    num_eps = len(eps_values)
    eps = torch.tensor(eps_values, dtype=torch.float64)
    sketch = _sketch(unit)
    check = _PairCheck(unit)
    # thresholds[e, j]: the least code product with which row j can be within eps_e of any
    # row. Products are integers, so rounding the threshold up loses nothing, and the
    # comparisons then run in the products' own dtype (no float64 copy of a tile).
    limit = float(2**24 if sketch.codes.dtype == torch.float32 else 2**31 - 1)
    thresholds = torch.ceil((1.0 - eps[:, None] - sketch.bound[None, :]) / sketch.scale)
    thresholds = thresholds.clamp_(-limit, limit).to(sketch.product_dtype)
    is_rep = torch.zeros(num_eps, num_rows, dtype=torch.bool)

    # Representatives so far, kept by their level: the largest eps at which they stand.
    # A tile of one level is screened against that eps's threshold alone, and levels with
    # a large eps come first, as their representatives cover the most rows.
    levels = sorted(range(num_eps), key=lambda e: -eps_values[e])
    buffers = {level: _RepBuffer(dim, sketch.codes.dtype) for level in levels}
    level_rank = torch.tensor(eps_values, dtype=torch.float64)

    for start in range(0, num_rows, block_size):
        stop = min(start + block_size, num_rows)
        block = _Block(
            check=check,
            eps=eps,
            start=start,
            thresholds=thresholds[:, start:stop],
            covered=torch.zeros(num_eps, stop - start, dtype=torch.bool),
        )
        codes = sketch.codes[start:stop]

        # 1. Coverage by representatives from earlier blocks. Each tile lists its
        # candidate pairs; they are decided together once the block has met every chunk
        # (a few tensor operations per block rather than per tile).
        found: list[tuple[Tensor, Tensor, Tensor]] = []
        for level in levels:
            level_thresholds = block.thresholds[level]
            for chunk in buffers[level].chunks():
                products = sketch.matmul(codes, chunk.codes)
                # One pass over the tile: a row whose largest product stays below the
                # threshold of the level is covered by no representative of the chunk.
                if bool((products.amax(dim=1) >= level_thresholds).any()):
                    found.append(_candidate_pairs(products, level_thresholds, chunk))
        if found:
            local, reps, values = (torch.cat(parts) for parts in zip(*found, strict=True))
            if local.numel():
                block.cover(local, reps, values, is_rep)

        # 2. Sequential resolution inside the block, in index order.
        uncovered = ~block.covered
        if stop - start > 1:
            near = block.near_pairs(sketch.matmul(codes, codes), uncovered)
            for e in range(num_eps):
                if near[e] is not None:
                    _resolve_block(near[e], uncovered[e])
        is_rep[:, start:stop] = uncovered

        # 3. File the block's new representatives (at any threshold) under their level.
        new_local = uncovered.any(dim=0).nonzero().flatten()
        if new_local.numel():
            member = uncovered[:, new_local]
            rank = torch.where(member, level_rank[:, None], -math.inf)
            level_of = rank.argmax(dim=0)
            for level in levels:
                chosen = new_local[level_of == level]
                if chosen.numel():
                    buffers[level].append(codes[chosen], start + chosen)

    return is_rep


@dataclass
class _RepChunk:
    """Up to ``_REP_CHUNK`` representatives of one level, stored contiguously.

    Attributes:
        codes: ``[C, d]`` their sketch codes; ``C`` is ``count`` rounded up to a multiple
            of ``_CELL``, with zero codes after the first ``count`` rows.
        rows: ``[C]`` their row indices (meaningless after ``count``).
        count: how many representatives the chunk holds.
    """

    codes: Tensor
    rows: Tensor
    count: int


class _RepBuffer:
    """The representatives of one level, in chunks of at most ``_REP_CHUNK`` rows."""

    def __init__(self, dim: int, code_dtype: torch.dtype) -> None:
        self._dim, self._code_dtype = dim, code_dtype
        self._full: list[_RepChunk] = []
        self._last: _RepChunk | None = None

    def append(self, codes: Tensor, rows: Tensor) -> None:
        """Add representatives (codes ``[n, d]``, row indices ``[n]``)."""
        done = 0
        while done < rows.numel():
            if self._last is None:
                self._last = _RepChunk(
                    codes=torch.zeros(_REP_CHUNK, self._dim, dtype=self._code_dtype),
                    rows=torch.zeros(_REP_CHUNK, dtype=torch.long),
                    count=0,
                )
            last = self._last
            take = min(rows.numel() - done, _REP_CHUNK - last.count)
            last.codes[last.count : last.count + take] = codes[done : done + take]
            last.rows[last.count : last.count + take] = rows[done : done + take]
            last.count += take
            done += take
            if last.count == _REP_CHUNK:
                self._full.append(last)
                self._last = None

    def chunks(self) -> list[_RepChunk]:
        """The chunks, the last one cut after its filled rows, rounded up to ``_CELL``
        (views, no copies)."""
        if self._last is None or self._last.count == 0:
            return list(self._full)
        last = self._last
        size = -(-last.count // _CELL) * _CELL
        return [*self._full, _RepChunk(last.codes[:size], last.rows[:size], last.count)]


def _candidate_pairs(
    products: Tensor, thresholds: Tensor, chunk: _RepChunk
) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of a tile at their row's threshold: (row, representative, product).

    In two steps, as listing the entries of a large tile directly is slow: the maxima of
    cells of ``_CELL`` columns first, then the entries of the cells that reach it.

    Args:
        products: ``[B, C]`` code products of a block with ``chunk`` (``C`` a multiple of
            ``_CELL``).
        thresholds: ``[B]`` the least product of a candidate, per row.
        chunk: the representatives.
    """
    size, columns = products.shape
    cells = products.view(size, columns // _CELL, _CELL)
    cell_row, cell = (cells.amax(dim=2) >= thresholds[:, None]).nonzero().unbind(1)
    values = cells[cell_row, cell]
    entry_row, offset = (values >= thresholds[cell_row][:, None]).nonzero().unbind(1)
    row, col = cell_row[entry_row], cell[entry_row] * _CELL + offset
    value = values[entry_row, offset]
    keep = col < chunk.count  # the zero codes that pad the last chunk are no candidates
    return row[keep], chunk.rows[col[keep]], value[keep]


class _PairCheck:
    """The float64 decision ``1 - <c_i, c_j> < eps`` for listed pairs, float32 first.

    A float32 inner product of unit rows is within ``(d + 2) u`` of the exact one (``u =
    2**-24``; ``d`` for the sum, 2 for rounding the rows; Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., eq. 3.5), whatever the summation order. A float32
    distance farther than twice that from ``eps`` therefore gives the float64 decision, and
    only the pairs closer to ``eps`` are recomputed in float64. Halves the memory traffic
    of gathering the rows of a pair, which dominates once there are many pairs; the float32
    copy of the rows is made only then (a healthy set has a handful of pairs, checked in
    float64 directly).
    """

    def __init__(self, unit: Tensor) -> None:
        self.unit = unit
        self._single: Tensor | None = None
        self._checked = 0  # pairs checked in float64 before the float32 copy was made
        self.margin = 2.0 * (unit.shape[1] + 2) * 2.0**-24

    def new_cache(self, num_pairs: int) -> tuple[Tensor, Tensor]:
        """Per-pair float32 and float64 distances, NaN until computed."""
        return (
            torch.full((num_pairs,), math.nan, dtype=torch.float64),
            torch.full((num_pairs,), math.nan, dtype=torch.float64),
        )

    def within(
        self,
        eps: float,
        pairs: Tensor,
        left: Tensor,
        right: Tensor,
        cache: tuple[Tensor, Tensor],
    ) -> Tensor:
        """Whether each listed pair is within ``eps``, exactly as in float64.

        Args:
            eps: the threshold.
            pairs: ``[n]`` indices into ``left``, ``right`` and the cache.
            left, right: ``[P]`` row indices of every pair of the cache.
            cache: from :meth:`new_cache`, filled in place as distances are computed.

        Returns:
            ``[n]`` bool.
        """
        single, double = cache
        todo = pairs[torch.isnan(single[pairs]) & torch.isnan(double[pairs])]
        if todo.numel():
            rows = self._single_rows(todo.numel())
            if rows is None:
                double[todo] = 1.0 - _pair_dots(self.unit, left[todo], right[todo])
            else:
                single[todo] = 1.0 - _pair_dots(rows, left[todo], right[todo]).double()
        # Where a float64 distance is known, use it; else the float32 one when clear.
        distance = torch.where(torch.isnan(double[pairs]), single[pairs], double[pairs])
        unsure = torch.isnan(double[pairs]) & ((distance - eps).abs() <= self.margin)
        if bool(unsure.any()):
            redo = pairs[unsure]
            double[redo] = 1.0 - _pair_dots(self.unit, left[redo], right[redo])
            distance[unsure] = double[redo]
        return distance < eps

    def _single_rows(self, count: int) -> Tensor | None:
        """The float32 copy of the rows, made once ``count`` more pairs would pass
        ``K / _SINGLE_COPY_AFTER`` checks in all; None before (check in float64)."""
        if self._single is None:
            if self._checked + count <= self.unit.shape[0] // _SINGLE_COPY_AFTER:
                self._checked += count
                return None
            self._single = self.unit.to(torch.float32)
        return self._single

    def set_exact(self, cache: tuple[Tensor, Tensor], dots: Tensor) -> None:
        """Store float64 inner products of every pair of the cache (a dense product)."""
        cache[1].copy_(1.0 - dots)


@dataclass
class _Block:
    """One block of rows during the scan: its thresholds and which rows are covered.

    Attributes:
        check: the exact pair decisions.
        eps: ``[E]`` float64 thresholds.
        start: index of the block's first row.
        thresholds: ``[E, B]`` least code products for a pair with each row to be within
            each eps (see :func:`_representative_masks`), in the products' dtype.
        covered: ``[E, B]`` bool, True where an earlier representative covers the row.
    """

    check: _PairCheck
    eps: Tensor
    start: int
    thresholds: Tensor
    covered: Tensor

    def cover(self, local: Tensor, reps: Tensor, values: Tensor, is_rep: Tensor) -> None:
        """Mark the rows that earlier representatives cover, from the candidate pairs.

        For each eps, each row is first checked against its candidate with the largest code
        product: in a collapsed set that one almost always covers it, so only the rows it
        misses (pairs near the threshold) need their other candidates checked.

        Args:
            local: ``[P]`` block-local row of each candidate pair.
            reps: ``[P]`` row index of its (earlier) representative.
            values: ``[P]`` their code product.
            is_rep: ``[E, K]`` the representatives found so far (final for the earlier
                rows).
        """
        # need[e, p]: pair p can decide its row at eps e (a representative there, the
        # product at that eps's threshold).
        need = is_rep[:, reps]
        need &= values[None, :] >= self.thresholds[:, local]
        left = self.start + local
        cache = self.check.new_cache(local.numel())
        span = 2 * int(values.abs().max()) + 2  # above twice any |product|: rows stay apart
        order_key = local.to(torch.long) * span - values.to(torch.long)
        for e in range(len(self.eps)):
            pairs = need[e].nonzero().flatten()
            if pairs.numel() == 0:
                continue
            # The pair with the largest product per row first: sort by row, then product.
            pairs = pairs[torch.argsort(order_key[pairs])]
            first = torch.ones(pairs.numel(), dtype=torch.bool)
            first[1:] = local[pairs[1:]] != local[pairs[:-1]]
            top = pairs[first]
            eps = float(self.eps[e])
            hit = self.check.within(eps, top, left, reps, cache)
            self.covered[e, local[top[hit]]] = True
            # Rows their top candidate misses: any other candidate may still cover them.
            rest = pairs[~first]
            rest = rest[~self.covered[e, local[rest]]]
            if rest.numel():
                hit = self.check.within(eps, rest, left, reps, cache)
                self.covered[e, local[rest[hit]]] = True

    def near_pairs(self, products: Tensor, uncovered: Tensor) -> list[Tensor | None]:
        """For each eps, the ``[B, B]`` bool matrix of block pairs ``i < j`` within eps.

        Only pairs of rows both still uncovered at that eps are kept (a covered row is
        never a representative), exactly as the sequential scan sees them.

        Args:
            products: ``[B, B]`` code products of the block with itself (overwritten).
            uncovered: ``[E, B]`` bool, rows no earlier representative covers.

        Returns:
            One entry per eps: the matrix with ``near[i, j]`` True iff ``i < j`` and
            ``1 - <c_i, c_j> < eps`` in float64, or None when there is no such pair.
        """
        num_eps, size = uncovered.shape
        # Each row's loosest threshold among the eps at which it is still uncovered.
        loosest = _masked_min(self.thresholds, uncovered)
        # Only pairs i < j count ([j, i] below the diagonal, row j's threshold). In a
        # healthy set no product below the diagonal reaches it: one pass settles the block.
        floor = torch.iinfo(torch.int32).min if products.dtype == torch.int32 else -math.inf
        lower = products.masked_fill_(_upper_triangle(size), floor)
        if not bool((lower.amax(dim=1) >= loosest).any()):
            return [None] * num_eps
        active = uncovered.any(dim=0)
        mask = lower >= loosest[:, None]
        mask &= active[None, :]
        later, earlier = mask.nonzero().unbind(1)
        need = uncovered[:, later] & uncovered[:, earlier]
        need &= lower[later, earlier][None, :] >= self.thresholds[:, later]
        keep = need.any(dim=0)
        later, earlier, need = later[keep], earlier[keep], need[:, keep]
        left, right = self.start + later, self.start + earlier
        cache = self.check.new_cache(later.numel())
        if later.numel() * _DENSE_FRACTION >= size * size // 2:
            # A collapsed block: one dense product is cheaper than gathering the pairs.
            block = self.check.unit[self.start : self.start + size]
            self.check.set_exact(cache, (block @ block.T)[later, earlier])
        result: list[Tensor | None] = []
        for e in range(num_eps):
            pairs = need[e].nonzero().flatten()
            if pairs.numel():
                pairs = pairs[self.check.within(float(self.eps[e]), pairs, left, right, cache)]
            if pairs.numel() == 0:
                result.append(None)
                continue
            near = torch.zeros(size, size, dtype=torch.bool)
            near[earlier[pairs], later[pairs]] = True
            result.append(near)
        return result


def _masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Column minima of ``values`` (``[E, B]``) over the entries where ``mask`` is True;
    the dtype's largest value (or inf) where a column has none."""
    if values.dtype.is_floating_point:
        ceiling = math.inf
    else:
        ceiling = torch.iinfo(values.dtype).max
    return torch.where(mask, values, ceiling).amin(dim=0)


@functools.lru_cache(maxsize=4)
def _upper_triangle(size: int) -> Tensor:
    """``[size, size]`` bool, True on and above the diagonal (cached per block size)."""
    return torch.ones(size, size, dtype=torch.bool).triu_()


def _pair_dots(rows: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Inner products ``<rows[left[p]], rows[right[p]]>`` for each p, in chunks."""
    out = torch.empty(left.numel(), dtype=rows.dtype)
    for first in range(0, left.numel(), _PAIR_CHUNK):
        last = first + _PAIR_CHUNK
        out[first:last] = (rows[left[first:last]] * rows[right[first:last]]).sum(dim=1)
    return out


def _resolve_block(near: Tensor, uncovered: Tensor) -> None:
    """Greedy scan of one block, updating ``uncovered`` in place to its representatives.

    Args:
        near: ``[B, B]`` bool, ``near[i, j]`` True iff ``i < j``, both rows are uncovered
            and ``1 - <c_i, c_j> < eps``.
        uncovered: ``[B]`` bool, True for rows no earlier block's representative covers.
    """
    # Rows with no near neighbour in the block are representatives whatever the order, so
    # only rows that have one need the (Python-level) sequential loop.
    involved = (near.any(dim=1) | near.any(dim=0)).nonzero().flatten().tolist()
    near_np = near.numpy()
    uncovered_np = uncovered.numpy()  # shares memory with ``uncovered``
    for i in involved:
        if uncovered_np[i]:
            uncovered_np &= ~near_np[i]
