"""The float64 decisions of the Definition 2.1 scan, for the pairs the sketch lists.

The scan of :mod:`protogmm.diagnostics._cover_scan` screens every pair of rows with an
integer product (:mod:`protogmm.diagnostics._int8_sketch`); the few pairs whose bound
reaches a threshold are decided here by ``1 - <c_i, c_j> < eps`` in float64 (float32 first
where that settles it, :class:`_PairCheck`), so the cover is the float64 one. A
:class:`_Block` applies the decisions to one block of rows: coverage by earlier
representatives, and the near pairs inside the block that its sequential pass resolves.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from protogmm.diagnostics._int8_sketch import _Sketch

# Pairs checked in float64 at a time (bounds the gathered rows).
_PAIR_CHUNK = 8192
# The float32 copy of the rows for the pair checks is made once more than K / this many
# pairs have needed a check (a healthy set never gets there).
_SINGLE_COPY_AFTER = 8
# Pairs filling more than 1 / _DENSE_FRACTION of a block's triangle are checked with one
# dense float64 product of the block.
_DENSE_FRACTION = 16


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


@dataclass(frozen=True)
class _LevelTable:
    """The levels' bounds by level index, for deciding candidate pairs (see ``_Level``).

    Attributes:
        scale: factor from a code product to an approximate cosine.
        bound: ``[E, K]`` float64, level e's bound for a pair with row j.
        rho: ``[E, K]`` float64, level e's residual code of each row.
        copies: ``[E]`` float64, level e's residual columns.
    """

    scale: float
    bound: Tensor
    rho: Tensor
    copies: Tensor

    @classmethod
    def of(cls, sketch: _Sketch) -> _LevelTable:
        """Gather the levels of ``sketch``."""
        return cls(
            scale=sketch.scale,
            bound=torch.stack([level.bound for level in sketch.levels]),
            rho=torch.stack([level.rho.to(torch.float64) for level in sketch.levels]),
            copies=torch.tensor([float(level.copies) for level in sketch.levels]),
        )

    def bounds(
        self, level: Tensor, rows: Tensor, reps: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Upper and lower bounds on the cosine of each pair, from its code product.

        Args:
            level: ``[P]`` level of the tile each pair came from.
            rows, reps: ``[P]`` row indices of the later row and the representative.
            values: ``[P]`` their code product at that level.
        """
        values = values.to(torch.float64)
        bound = self.bound[level, rows]
        residual = self.copies[level] * self.rho[level, rows] * self.rho[level, reps]
        upper = values * self.scale + bound
        lower = (values - 2.0 * residual) * self.scale - bound
        return upper, lower


@dataclass
class _Block:
    """One block of rows during the scan: its thresholds and which rows are covered.

    Attributes:
        check: the exact pair decisions.
        table: the levels' bounds (for pairs with earlier representatives).
        eps: ``[E]`` float64 thresholds.
        start: index of the block's first row.
        thresholds: ``[E, B]`` least code products of the full codes for a pair with each
            row to be within each eps, in the products' dtype (pairs inside the block).
        covered: ``[E, B]`` bool, True where an earlier representative covers the row.
    """

    check: _PairCheck
    table: _LevelTable
    eps: Tensor
    start: int
    thresholds: Tensor
    covered: Tensor

    def cover(
        self, local: Tensor, reps: Tensor, values: Tensor, level: Tensor, is_rep: Tensor
    ) -> None:
        """Mark the rows that earlier representatives cover, from the candidate pairs.

        For each eps, a row with a pair whose lower bound passes ``1 - eps`` is covered
        with no float check. The others are first checked against their candidate with the
        largest code product: in a collapsed set that one almost always covers the row, so
        only the rows it misses (pairs near the threshold) need their other candidates.

        Args:
            local: ``[P]`` block-local row of each candidate pair.
            reps: ``[P]`` row index of its (earlier) representative.
            values: ``[P]`` their code product.
            level: ``[P]`` the level of the tile the pair came from.
            is_rep: ``[E, K]`` the representatives found so far (final for the earlier
                rows).
        """
        left = self.start + local
        upper, lower = self.table.bounds(level, left, reps, values)
        least = 1.0 - self.eps[:, None]
        # need[e, p]: pair p can decide its row at eps e (a representative there, the
        # upper bound at that eps's threshold); sure[e, p]: its lower bound passes it too.
        need = is_rep[:, reps]
        need &= upper[None, :] >= least
        sure = need & (lower[None, :] > least)
        cache = self.check.new_cache(local.numel())
        span = 2 * int(values.abs().max()) + 2  # above twice any |product|: rows stay apart
        order_key = local.to(torch.long) * span - values.to(torch.long)
        for e in range(len(self.eps)):
            self.covered[e, local[sure[e]]] = True
            pairs = need[e].nonzero().flatten()
            pairs = pairs[~self.covered[e, local[pairs]]]
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

    def near_pairs(self, products: Tensor, uncovered: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """For each eps, the ``[B, B]`` bool matrix of block pairs ``i < j`` within eps.

        Only pairs of rows both still uncovered at that eps are kept (a covered row is
        never a representative), exactly as the sequential scan sees them.

        Args:
            products: ``[B, B]`` code products of the block with itself (overwritten).
            uncovered: ``[E, B]`` bool, rows no earlier representative covers.

        Returns:
            One entry per eps: the matrix with ``near[i, j]`` True iff ``i < j`` and
            ``1 - <c_i, c_j> < eps`` in float64 and the increasing rows in such a pair, or
            None when there is no such pair.
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
        result: list[tuple[Tensor, Tensor] | None] = []
        for e in range(num_eps):
            pairs = need[e].nonzero().flatten()
            if pairs.numel():
                pairs = pairs[self.check.within(float(self.eps[e]), pairs, left, right, cache)]
            if pairs.numel() == 0:
                result.append(None)
                continue
            near = torch.zeros(size, size, dtype=torch.bool)
            near[earlier[pairs], later[pairs]] = True
            result.append((near, torch.cat([earlier[pairs], later[pairs]]).unique()))
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
