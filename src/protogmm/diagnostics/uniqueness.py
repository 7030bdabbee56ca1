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
Memory is ``O(K d + block_size * rep_chunk)``; time is ``O(K R d)`` for ``R``
representatives, dominated by float32 matrix products (``K = 65536``, ``d = 256`` with no
collapse: about 11 s on two idle CPU cores, about 30 s when they are shared).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from protogmm._checks import check_in_range, check_matrix, check_positive_int

__all__ = ["DEFAULT_EPS", "representatives", "unique_prototype_curve", "unique_prototypes"]

DEFAULT_EPS: tuple[float, ...] = (0.025, 0.05, 0.1, 0.25, 0.5)
"""Cosine-distance thresholds reported by default (0.025 is the paper's headline value)."""

_DEFAULT_BLOCK_SIZE = 1024
# Rows of the representative buffer multiplied against one block at a time: bounds the
# temporary similarity tile to rep_chunk x block_size entries (16 MiB in float32).
_REP_CHUNK = 4096
# Unit roundoff of float32, used to bound the error of the float32 prefilter.
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24


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
    largest = rows.abs().amax(dim=1, keepdim=True)
    zero_rows = (largest == 0).flatten()
    if bool(zero_rows.any()):
        row = int(zero_rows.nonzero()[0, 0])
        raise ValueError(
            f"prototypes row {row} is all zeros (norm 0), so its direction is undefined"
        )
    rows = rows / largest
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)


def _representative_masks(unit: Tensor, eps_values: list[float], block_size: int) -> Tensor:
    """Run the greedy index-order cover for every threshold at once.

    Rows are visited in blocks in index order. For each block, first every representative
    found in earlier blocks (all of which precede the block) marks the block rows it covers;
    then the block's still-uncovered rows are resolved sequentially with the block's own
    Gram matrix. This gives exactly the row-by-row scan, because a row can only be covered
    by an earlier representative.

    The large representative-to-block products run in float32 as a prefilter: a pair whose
    float32 distance exceeds ``eps`` by more than a rigorous rounding-error bound cannot be
    within ``eps`` in float64, and the few remaining candidate pairs are recomputed in
    float64. The decision is therefore the float64 one.

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
    is_rep = torch.zeros(num_eps, num_rows, dtype=torch.bool)

    # The float32 error bound below assumes IEEE float32 products and sums; if the user
    # allowed reduced-precision float32 matmuls, stay in float64 throughout.
    use_prefilter = torch.get_float32_matmul_precision() == "highest"
    prefilter_dtype = torch.float32 if use_prefilter else torch.float64
    # |fl32(<a, b>) - <a, b>| <= (d + 2) u (1 + O(u)) for unit a, b: d for the accumulated
    # dot product, 2 for rounding a and b to float32 (Higham, Accuracy and Stability of
    # Numerical Algorithms, 2nd ed., eq. 3.5). Doubled for safety; float64 rounding of the
    # comparison itself is far below this.
    margin = 2.0 * (dim + 2) * _FLOAT32_UNIT_ROUNDOFF if use_prefilter else 0.0

    # Representatives at any threshold, appended in index order, with the rows stored
    # contiguously so that each block needs one matmul per chunk of them.
    union_rows = torch.empty(num_rows, dtype=torch.long)
    union_vectors = torch.empty(num_rows, dim, dtype=prefilter_dtype)
    union_is_rep = torch.zeros(num_eps, num_rows, dtype=torch.bool)
    num_union = 0

    for start in range(0, num_rows, block_size):
        stop = min(start + block_size, num_rows)
        block = unit[start:stop]
        block_prefilter = block.to(prefilter_dtype)
        covered = torch.zeros(num_eps, stop - start, dtype=torch.bool)

        # 1. Coverage by representatives from earlier blocks.
        for chunk_start in range(0, num_union, _REP_CHUNK):
            chunk_stop = min(chunk_start + _REP_CHUNK, num_union)
            similarity = union_vectors[chunk_start:chunk_stop] @ block_prefilter.T
            best_over_all = None
            for e, eps in enumerate(eps_values):
                member = union_is_rep[e, chunk_start:chunk_stop]
                if not bool(member.any()):
                    continue
                # min_i (1 - s_i) = 1 - max_i s_i exactly (rounding is monotone), so the
                # column maximum decides "some representative is within eps".
                if bool(member.all()):
                    if best_over_all is None:
                        best_over_all = similarity.amax(dim=0)
                    best = best_over_all
                else:
                    best = similarity[member].amax(dim=0)
                near = (1.0 - best.to(torch.float64)) < eps + margin
                near &= ~covered[e]
                if not use_prefilter:
                    covered[e] |= near
                    continue
                candidates = near.nonzero().flatten()
                if candidates.numel() == 0:
                    continue
                rep_rows = union_rows[chunk_start:chunk_stop][member]
                exact = unit[rep_rows] @ block[candidates].T
                hit = ((1.0 - exact) < eps).any(dim=0)
                covered[e, candidates[hit]] = True

        # 2. Sequential resolution inside the block, in index order.
        distance = 1.0 - block @ block.T
        for e, eps in enumerate(eps_values):
            uncovered = ~covered[e]
            if bool(uncovered.any()):
                _resolve_block(distance, eps, uncovered)
            is_rep[e, start:stop] = uncovered

        # 3. Append the block's new representatives (at any threshold) to the buffer.
        new_local = is_rep[:, start:stop].any(dim=0).nonzero().flatten()
        count = new_local.numel()
        union_rows[num_union : num_union + count] = start + new_local
        union_vectors[num_union : num_union + count] = block_prefilter[new_local]
        union_is_rep[:, num_union : num_union + count] = is_rep[:, start + new_local]
        num_union += count

    return is_rep


def _resolve_block(distance: Tensor, eps: float, uncovered: Tensor) -> None:
    """Greedy scan of one block, updating ``uncovered`` in place to its representatives.

    Args:
        distance: ``[B, B]`` float64 cosine distances between the block's rows.
        eps: threshold.
        uncovered: ``[B]`` bool, True for rows no earlier block's representative covers.
    """
    # Only a row i < j that is itself still a candidate can cover j.
    near = torch.triu(distance < eps, diagonal=1)
    near &= uncovered[:, None]
    near &= uncovered[None, :]
    # Rows with no near neighbour in the block are representatives whatever the order, so
    # only rows that have one need the (Python-level) sequential loop.
    involved = (near.any(dim=1) | near.any(dim=0)).nonzero().flatten().tolist()
    if not involved:
        return
    near_np = near.numpy()
    uncovered_np = uncovered.numpy()  # shares memory with ``uncovered``
    for i in involved:
        if uncovered_np[i]:
            uncovered_np &= ~near_np[i]
