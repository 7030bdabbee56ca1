"""The blocked greedy scan of Definition 2.1: every row against every earlier representative.

Rows are visited in blocks in index order (:func:`_representative_masks`); a block meets
the representatives of earlier blocks in tiles of one int8 product each (with the codes
of the representatives' level, :class:`_Level`), then resolves its own rows among
themselves (with every coordinate). Representatives are kept in chunks by their level,
the largest eps at which they stand (:class:`_RepBuffer`). The sketch's products only
list candidate pairs and settle the clear ones; the others are decided in float64 by
:mod:`protogmm.diagnostics._pair_check`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from protogmm.diagnostics._int8_sketch import _Sketch, _sketch
from protogmm.diagnostics._pair_check import _Block, _LevelTable, _PairCheck

# Representatives multiplied against one block at a time: bounds the code-product tile to
# block_size x _REP_CHUNK int32 entries (8 MiB at the default block size). Larger tiles
# spill the last-level cache, and the int8 product then runs at a third of its speed.
_REP_CHUNK = 2048
# Columns of a tile reduced together when listing its candidate pairs (divides _REP_CHUNK).
_CELL = 64
# A tile's candidates are listed from its rows that have one when they are at most
# 1 / _SPARSE_ROWS of the block, else through its cells.
_SPARSE_ROWS = 16


def _representative_masks(unit: Tensor, eps_values: list[float], block_size: int) -> Tensor:
    """Run the greedy index-order cover for every threshold at once.

    Rows are visited in blocks in index order. For each block, first every representative
    found in earlier blocks (all of which precede the block) marks the block rows it covers;
    then the block's still-uncovered rows are resolved sequentially among themselves. This
    gives exactly the row-by-row scan, because a row can only be covered by an earlier
    representative.

    Every comparison starts from the integer sketch (:func:`_sketch`): one int8 matrix
    product per tile bounds the cosine of every pair in it, from above and below, with the
    few coordinates its eps needs (:class:`_Level`). Only pairs whose upper bound reaches
    ``1 - eps`` are looked at again: those whose lower bound passes it are within eps,
    the others are decided by ``1 - <c_i, c_j> < eps`` in float64 (:class:`_PairCheck`).
    A pair whose upper bound stays below cannot pass that float64 test, and one whose lower
    bound passes cannot fail it. The decisions, hence the cover, are therefore the float64
    ones, whatever the sketch.

    Args:
        unit: ``[K, d]`` CPU float64 tensor with unit-norm rows.
        eps_values: thresholds in ``(0, 2]``.
        block_size: rows per block.

    Returns:
        ``[len(eps_values), K]`` bool tensor; entry ``[e, i]`` is True iff row ``i`` is a
        representative at ``eps_values[e]``.
    """
    num_rows = unit.shape[0]
    num_eps = len(eps_values)
    eps = torch.tensor(eps_values, dtype=torch.float64)
    sketch = _sketch(unit, eps_values)
    table = _LevelTable.of(sketch)
    check = _PairCheck(unit)
    # Tiles of level e are screened at eps e with level e's codes; pairs inside a block
    # with every coordinate, at every eps.
    screens = _product_thresholds(sketch, table.bound, eps[:, None])
    inside = _product_thresholds(sketch, sketch.full.bound[None, :], eps[:, None])
    is_rep = torch.zeros(num_eps, num_rows, dtype=torch.bool)

    # Representatives so far, kept by their level: the largest eps at which they stand.
    # A tile of one level is screened against that eps's threshold alone, and levels with
    # a large eps come first (the dict keeps this order), as their representatives cover
    # the most rows.
    levels = sorted(range(num_eps), key=lambda e: -eps_values[e])
    buffers = {e: _RepBuffer(sketch.levels[e].width, sketch.codes.dtype) for e in levels}
    level_rank = torch.tensor(eps_values, dtype=torch.float64)

    for start in range(0, num_rows, block_size):
        stop = min(start + block_size, num_rows)
        block = _Block(
            check=check,
            table=table,
            eps=eps,
            start=start,
            thresholds=inside[:, start:stop],
            covered=torch.zeros(num_eps, stop - start, dtype=torch.bool),
        )
        codes = {e: sketch.level_codes(sketch.levels[e], start, stop) for e in levels}
        # 1. Coverage by representatives from earlier blocks.
        _cover_by_earlier(block, codes, screens[:, start:stop], sketch, buffers, is_rep)
        # 2. Sequential resolution inside the block, in index order.
        uncovered = _resolve_inside(block, sketch.codes[start:stop], sketch)
        is_rep[:, start:stop] = uncovered
        # 3. File the block's new representatives (at any threshold) under their level.
        _file_representatives(buffers, level_rank, uncovered, codes, start)

    return is_rep


def _product_thresholds(sketch: _Sketch, bound: Tensor, eps: Tensor) -> Tensor:
    """The least code product with which a row can be within ``eps`` of any row.

    ``bound`` and ``eps`` broadcast to ``[E, K]``. Products are integers, so rounding the
    threshold up loses nothing, and the comparisons then run in the products' own dtype (no
    float64 copy of a tile).
    """
    limit = float(2**24 if sketch.codes.dtype == torch.float32 else 2**31 - 1)
    thresholds = torch.ceil((1.0 - eps - bound) / sketch.scale)
    return thresholds.clamp_(-limit, limit).to(sketch.product_dtype)


def _cover_by_earlier(
    block: _Block,
    codes: dict[int, Tensor],
    screens: Tensor,
    sketch: _Sketch,
    buffers: dict[int, _RepBuffer],
    is_rep: Tensor,
) -> None:
    """Step 1 of a block: mark its rows that representatives of earlier blocks cover.

    Each tile (the block against one chunk of one level) lists its candidate pairs; they
    are decided together once the block has met every chunk (a few tensor operations per
    block rather than per tile).

    Args:
        block: the block; its ``covered`` is updated in place.
        codes: the block's codes at each level.
        screens: ``[E, B]`` least products of a candidate in a tile of each level.
        sketch: the sketch of all rows.
        buffers: the earlier representatives by level, in screening order.
        is_rep: ``[E, K]`` the representatives found so far.
    """
    found: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for level, buffer in buffers.items():
        level_thresholds = screens[level]
        for chunk in buffer.chunks():
            products = sketch.matmul(codes[level], chunk.codes)
            # One pass over the tile: a row whose largest product stays below the
            # threshold of the level is covered by no representative of the chunk.
            hit = products.amax(dim=1) >= level_thresholds
            if bool(hit.any()):
                local, reps, values = _candidate_pairs(products, hit, level_thresholds, chunk)
                found.append((local, reps, values, torch.full_like(local, level)))
    if found:
        local, reps, values, level = (torch.cat(parts) for parts in zip(*found, strict=True))
        if local.numel():
            block.cover(local, reps, values, level, is_rep)


def _resolve_inside(block: _Block, codes: Tensor, sketch: _Sketch) -> Tensor:
    """Step 2 of a block: the greedy scan of its uncovered rows among themselves.

    Returns:
        ``[E, B]`` bool, True for the block's representatives at each eps.
    """
    uncovered = ~block.covered
    if codes.shape[0] > 1:
        near = block.near_pairs(sketch.matmul(codes, codes), uncovered)
        for e in range(len(near)):
            if near[e] is not None:
                _resolve_block(*near[e], uncovered[e])
    return uncovered


def _file_representatives(
    buffers: dict[int, _RepBuffer],
    level_rank: Tensor,
    uncovered: Tensor,
    codes: dict[int, Tensor],
    start: int,
) -> None:
    """Step 3 of a block: file its new representatives under their level.

    Args:
        buffers: the representatives by level, appended to in place.
        level_rank: ``[E]`` the eps of each level (a representative's level is the largest
            eps at which it stands).
        uncovered: ``[E, B]`` the block's representatives at each eps.
        codes: the block's codes at each level.
        start: index of the block's first row.
    """
    new_local = uncovered.any(dim=0).nonzero().flatten()
    if new_local.numel():
        member = uncovered[:, new_local]
        rank = torch.where(member, level_rank[:, None], -math.inf)
        level_of = rank.argmax(dim=0)
        for level, buffer in buffers.items():
            chosen = new_local[level_of == level]
            if chosen.numel():
                buffer.append(codes[level][chosen], start + chosen)


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

    def __init__(self, width: int, code_dtype: torch.dtype) -> None:
        self._dim, self._code_dtype = width, code_dtype
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
    products: Tensor, hit: Tensor, thresholds: Tensor, chunk: _RepChunk
) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of a tile at their row's threshold: (row, representative, product).

    Listing the entries of a large tile directly is slow. Where few rows have one, their
    rows are gathered; else the maxima of cells of ``_CELL`` columns are taken first, then
    the entries of the cells that reach it.

    Args:
        products: ``[B, C]`` code products of a block with ``chunk`` (``C`` a multiple of
            ``_CELL``).
        hit: ``[B]`` bool, the rows whose largest product reaches their threshold.
        thresholds: ``[B]`` the least product of a candidate, per row.
        chunk: the representatives.
    """
    size, columns = products.shape
    rows = hit.nonzero().flatten()
    if rows.numel() * _SPARSE_ROWS <= size:
        values = products[rows]
        entry_row, col = (values >= thresholds[rows, None]).nonzero().unbind(1)
        row, value = rows[entry_row], values[entry_row, col]
    else:
        cells = products.view(size, columns // _CELL, _CELL)
        cell_row, cell = (cells.amax(dim=2) >= thresholds[:, None]).nonzero().unbind(1)
        values = cells[cell_row, cell]
        entry_row, offset = (values >= thresholds[cell_row][:, None]).nonzero().unbind(1)
        row, col = cell_row[entry_row], cell[entry_row] * _CELL + offset
        value = values[entry_row, offset]
    keep = col < chunk.count  # the zero codes that pad the last chunk are no candidates
    return row[keep], chunk.rows[col[keep]], value[keep]


def _resolve_block(near: Tensor, involved: Tensor, uncovered: Tensor) -> None:
    """Greedy scan of one block, updating ``uncovered`` in place to its representatives.

    Args:
        near: ``[B, B]`` bool, ``near[i, j]`` True iff ``i < j``, both rows are uncovered
            and ``1 - <c_i, c_j> < eps``.
        involved: the increasing rows in such a pair.
        uncovered: ``[B]`` bool, True for rows no earlier block's representative covers.
    """
    # Rows with no near neighbour in the block are representatives whatever the order, so
    # only rows that have one need the (Python-level) sequential loop.
    near_np = near.numpy()
    uncovered_np = uncovered.numpy()  # shares memory with ``uncovered``
    for i in involved.tolist():
        if uncovered_np[i]:
            uncovered_np &= ~near_np[i]
