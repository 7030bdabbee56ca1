"""Tests of the unique-prototype count (Definition 2.1, Arteaga et al., ICLR 2026).

The reference is the literal row-by-row greedy scan in NumPy float64; the blocked
implementation, which screens pairs with int8 products of a sketch and decides the rest in
float64, must agree with it exactly (same representatives).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protogmm.diagnostics import (
    DEFAULT_EPS,
    _int8_sketch,
    data_reference_curve,
    representatives,
    unique_prototype_curve,
    unique_prototypes,
    uniqueness,
)


def naive_representatives(prototypes: torch.Tensor, eps: float) -> list[int]:
    """Literal sequential scan of Definition 2.1, O(K^2), NumPy float64."""
    rows = prototypes.detach().to(torch.float64).numpy()
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    covered = np.zeros(len(unit), dtype=bool)
    reps = []
    for i in range(len(unit)):
        if covered[i]:
            continue
        reps.append(i)
        covered[i + 1 :] |= (1.0 - unit[i + 1 :] @ unit[i]) < eps
    return reps


def naive_count(prototypes: torch.Tensor, eps: float) -> int:
    return len(naive_representatives(prototypes, eps))


def cosine_distances(prototypes: torch.Tensor) -> np.ndarray:
    rows = prototypes.detach().to(torch.float64).numpy()
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return 1.0 - unit @ unit.T


def random_clustered(
    num_rows: int, num_clusters: int, dim: int, spread: float, seed: int
) -> torch.Tensor:
    """Gaussian blobs around random centres; ``spread`` sets how often rows merge."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_clusters, (num_rows,), generator=gen)
    noise = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    return centres[labels] + spread * noise


def near_copies(base: torch.Tensor, cosine: float, seed: int) -> torch.Tensor:
    """Unit vectors at exactly ``cosine`` from the unit rows of ``base`` (random directions)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(base.to(torch.float64), dim=1)
    direction = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    direction -= (direction * base).sum(dim=1, keepdim=True) * base  # orthogonal to base
    direction = torch.nn.functional.normalize(direction, dim=1)
    return cosine * base + math.sqrt(1.0 - cosine**2) * direction


@pytest.fixture
def float64_matmul_only():
    """Allow reduced-precision float32 matmuls (the sketch must then rotate in float64)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(previous)


# --------------------------------------------------------------------------- known counts


def test_random_vectors_are_all_unique():
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(2000, 64, generator=gen)
    assert unique_prototypes(prototypes, 0.025) == 2000


def test_planted_near_duplicates_count_the_base_vectors():
    num_base, num_rows = 40, 1000
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(num_base, 64, generator=gen, dtype=torch.float64)
    owner = torch.cat([torch.arange(num_base), torch.randint(0, num_base, (num_rows - num_base,))])
    # Every row is a cos-0.999 copy of its base vector (distance 0.001 to it, at most
    # ~0.004 to the other copies), in shuffled order so groups interleave.
    rows = near_copies(base[owner], 0.999, seed=2)[torch.randperm(num_rows, generator=gen)]
    assert unique_prototypes(rows, 0.025) == num_base
    assert unique_prototypes(rows, 0.1, block_size=64) == num_base
    # Below the smallest pairwise distance (~0.0016 between copies) nothing merges.
    assert unique_prototypes(rows, 0.0005) == num_rows


def test_single_row_and_extreme_eps():
    gen = torch.Generator().manual_seed(3)
    prototypes = torch.randn(50, 8, generator=gen)
    assert unique_prototypes(prototypes[:1]) == 1
    # eps = 2 merges everything except exact antipodes (1 - cos = 2 is not < 2).
    assert unique_prototypes(prototypes, 2.0) == 1
    antipodes = torch.stack([prototypes[0], -prototypes[0]])
    assert unique_prototypes(antipodes, 2.0) == 2
    assert unique_prototypes(torch.cat([prototypes, prototypes]), 1e-9) == 50


@pytest.mark.parametrize("dim", [8, 128, 256, 768])
def test_one_or_two_rows_in_any_dimension(dim: int) -> None:
    """A set of one row (e.g. the one prototype a collapsed head still uses) counts 1 at
    every eps in every dimension; the sketch's prefix choice has no pair to sample there."""
    rows = torch.randn(2, dim, generator=torch.Generator().manual_seed(dim))
    assert unique_prototype_curve(rows[:1]) == dict.fromkeys(DEFAULT_EPS, 1)
    assert unique_prototype_curve(rows) == {e: naive_count(rows, e) for e in DEFAULT_EPS}


def test_scale_does_not_matter_and_input_is_untouched():
    gen = torch.Generator().manual_seed(4)
    prototypes = random_clustered(300, 30, 16, 0.3, seed=4)
    scales = torch.rand(300, 1, generator=gen, dtype=torch.float64) * 1e3 + 1e-3
    before = prototypes.clone()
    assert unique_prototypes(prototypes * scales, 0.1) == unique_prototypes(prototypes, 0.1)
    assert torch.equal(prototypes, before)
    # Huge and tiny float64 rows would overflow / underflow a naive norm.
    assert unique_prototypes(prototypes * 1e300, 0.1) == naive_count(prototypes, 0.1)
    assert unique_prototypes(prototypes * 1e-300, 0.1) == naive_count(prototypes, 0.1)


# ------------------------------------------------------------------ equality with reference

DATASETS = {
    "random": lambda: torch.randn(333, 16, generator=torch.Generator().manual_seed(5)),
    "clustered_tight": lambda: random_clustered(400, 25, 16, 0.15, seed=6),
    "clustered_loose": lambda: random_clustered(400, 10, 8, 0.6, seed=7),
    "low_dim": lambda: torch.randn(300, 3, generator=torch.Generator().manual_seed(8)),
    "exact_duplicates": lambda: random_clustered(100, 100, 16, 0.0, seed=9),
}
EPS_GRID = (1e-6, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("block_size", [1, 7, 64, 4096])
def test_matches_naive_scan(dataset, block_size):
    prototypes = DATASETS[dataset]()
    if block_size == 1:
        prototypes = prototypes[:150]  # one row per block: keep the Python loop short
    expected = {eps: naive_representatives(prototypes, eps) for eps in EPS_GRID}
    for eps in EPS_GRID:
        reps = representatives(prototypes, eps, block_size=block_size)
        assert reps.tolist() == expected[eps], (dataset, eps)
        assert unique_prototypes(prototypes, eps, block_size=block_size) == len(expected[eps])
    curve = unique_prototype_curve(prototypes, EPS_GRID, block_size=block_size)
    assert curve == {eps: len(expected[eps]) for eps in EPS_GRID}


@pytest.mark.parametrize("block_size", [5, 1024])
def test_matches_naive_scan_without_float32_prefilter(float64_matmul_only, block_size):
    prototypes = random_clustered(400, 25, 16, 0.3, seed=10)
    expected = {eps: naive_representatives(prototypes, eps) for eps in EPS_GRID}
    for eps in (0.01, 0.1, 0.5):
        reps = representatives(prototypes, eps, block_size=block_size)
        assert reps.tolist() == expected[eps]
    # The shared pass must use, per threshold, only that threshold's representatives.
    curve = unique_prototype_curve(prototypes, EPS_GRID, block_size=block_size)
    assert curve == {eps: len(reps) for eps, reps in expected.items()}


@pytest.mark.parametrize("block_size", [1, 8, 1024])
def test_pairs_straddling_the_threshold_are_decided_in_float64(block_size):
    """Distances eps * (1 +- 1e-9) are indistinguishable in float32 but not in float64."""
    eps, num_base = 0.1, 60
    gen = torch.Generator().manual_seed(11)
    base = torch.nn.functional.normalize(torch.randn(num_base, 64, generator=gen).double(), dim=1)
    outside = torch.arange(num_base) % 2 == 0  # half the copies just outside eps
    # Built in float64 explicitly: a float32 1 + 1e-9 would round to 1.
    offset = torch.full((num_base,), 1e-9, dtype=torch.float64)
    relative = 1.0 + torch.where(outside, offset, -offset)
    cosines = 1.0 - eps * relative
    copies = torch.stack(
        [near_copies(base[i : i + 1], float(c), seed=i)[0] for i, c in enumerate(cosines)]
    )
    # Bases first, copies later, so the cross-block (prefiltered) path decides the pairs.
    rows = torch.cat([base, copies])
    assert unique_prototypes(rows, eps, block_size=block_size) == num_base + int(outside.sum())
    assert unique_prototypes(rows, eps, block_size=block_size) == naive_count(rows, eps)


@settings(max_examples=40, deadline=None)
@given(
    num_rows=st.integers(1, 120),
    num_clusters=st.integers(1, 30),
    dim=st.integers(2, 12),
    spread=st.floats(0.0, 1.0),
    eps=st.floats(1e-4, 2.0),
    block_size=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_result_is_the_greedy_cover(num_rows, num_clusters, dim, spread, eps, block_size, seed):
    """Reps are pairwise >= eps apart, and every other row is < eps from an earlier rep.

    These two facts determine the greedy index-order cover uniquely (by induction on the
    row index), so this is a full specification, checked on a dense distance matrix.
    """
    prototypes = random_clustered(num_rows, num_clusters, dim, spread, seed)
    reps = representatives(prototypes, eps, block_size=block_size).tolist()
    distance = cosine_distances(prototypes)
    is_rep = np.zeros(num_rows, dtype=bool)
    is_rep[reps] = True
    assert reps == sorted(reps) and reps[0] == 0
    for j in range(num_rows):
        earlier_reps_within = [i for i in reps if i < j and distance[i, j] < eps]
        assert bool(earlier_reps_within) != is_rep[j], j
    assert reps == naive_representatives(prototypes, eps)


# ------------------------------------------------- int8 sketch: exact on planted sets


def planted_groups(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """Random bases and near-copies at 0.3 eps, 0.9 eps and eps (1 +- 1e-9), shuffled.

    Covers every eps of the sweep: groups merge at different eps, and many pairs sit a
    hair either side of a threshold (only float64 can tell them apart).
    """
    gen = torch.Generator().manual_seed(seed)
    num_base = num_rows // 4
    base = torch.nn.functional.normalize(
        torch.randn(num_base, dim, generator=gen, dtype=torch.float64), dim=1
    )
    distances = torch.tensor(
        [f * eps for eps in DEFAULT_EPS for f in (0.3, 0.9, 1 - 1e-9, 1 + 1e-9)],
        dtype=torch.float64,
    )
    owner = torch.randint(0, num_base, (num_rows - num_base,), generator=gen)
    distance = distances[torch.randint(0, len(distances), (num_rows - num_base,), generator=gen)]
    direction = torch.randn(num_rows - num_base, dim, generator=gen, dtype=torch.float64)
    direction -= (direction * base[owner]).sum(dim=1, keepdim=True) * base[owner]
    direction = torch.nn.functional.normalize(direction, dim=1)
    cosine = (1.0 - distance)[:, None]
    copies = cosine * base[owner] + torch.sqrt(1.0 - cosine**2) * direction
    return torch.cat([base, copies])[torch.randperm(num_rows, generator=gen)]


def trained_like(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """A smooth cloud with a 1/k spectrum: nearly all unique at 0.025, few at 0.5."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    spectrum = torch.arange(1, dim + 1, dtype=torch.float64).reciprocal()
    return (
        (torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * spectrum) @ basis.T
    ).float()


def random_rows(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian rows: all unique at every eps of the sweep in d = 256."""
    return torch.randn(num_rows, dim, generator=torch.Generator().manual_seed(seed))


def dyadic_ties(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """Rows of +-1 (unit after scaling by 1/sqrt(dim), dim a power of 4) and copies with
    some signs flipped. Every distance is a multiple of 2 / dim and is computed exactly in
    any order, so distances of exactly 0.25 and 0.5 (two eps of the sweep) occur."""
    gen = torch.Generator().manual_seed(seed)
    num_base = num_rows // 4
    base = torch.randint(0, 2, (num_base, dim), generator=gen) * 2 - 1
    rows = base[torch.randint(0, num_base, (num_rows - num_base,), generator=gen)].clone()
    # Flipping f signs gives distance 2 f / dim: f = dim / 8 is 0.25, dim / 4 is 0.5.
    choices = [0, 1, dim // 16, dim // 8 - 1, dim // 8, dim // 8 + 1, dim // 4 - 1, dim // 4]
    flips = torch.tensor(choices)[torch.randint(0, len(choices), (len(rows),), generator=gen)]
    for row, count in zip(rows, flips.tolist(), strict=True):
        row[torch.randperm(dim, generator=gen)[:count]] *= -1
    rows = torch.cat([base, rows]).double() / math.sqrt(dim)
    return rows[torch.randperm(num_rows, generator=gen)]


SWEEP_AND_MORE = (*DEFAULT_EPS, 1e-6, 0.01, 0.125, 1.0)


def assert_matches_naive(prototypes: torch.Tensor, block_sizes=(1024,)) -> dict[float, int]:
    """Same representatives as the literal scan at every eps, and the same curve."""
    expected = {eps: naive_representatives(prototypes, eps) for eps in SWEEP_AND_MORE}
    for block_size in block_sizes:
        curve = unique_prototype_curve(prototypes, SWEEP_AND_MORE, block_size=block_size)
        assert curve == {eps: len(reps) for eps, reps in expected.items()}, block_size
        for eps in (0.025, 0.25, 0.5):
            got = representatives(prototypes, eps, block_size=block_size).tolist()
            assert got == expected[eps], (block_size, eps)
    return {eps: len(reps) for eps, reps in expected.items()}


@pytest.mark.parametrize("dim", [64, 256])
def test_planted_groups_at_every_eps_match_the_naive_scan(dim):
    counts = assert_matches_naive(planted_groups(1600, dim, seed=20), block_sizes=(1024, 333))
    # The planted groups do merge, differently at each eps of the sweep.
    sweep = [counts[eps] for eps in DEFAULT_EPS]
    assert sweep == sorted(sweep, reverse=True) and sweep[0] < 1600 and sweep[-1] < sweep[0]


def test_random_unit_rows_match_the_naive_scan_in_d256():
    """The healthy case: every pair is screened out by the int8 products alone."""
    prototypes = torch.randn(2500, 256, generator=torch.Generator().manual_seed(21))
    counts = assert_matches_naive(prototypes)
    assert all(counts[eps] == 2500 for eps in DEFAULT_EPS)


def test_trained_like_cloud_matches_the_naive_scan():
    """Many pairs near every threshold: the sketch's candidates are mostly decided in float."""
    counts = assert_matches_naive(trained_like(2000, 128, seed=22), block_sizes=(1024, 97))
    assert counts[0.5] < counts[0.025]


@pytest.mark.parametrize("dim", [16, 256])
def test_distances_exactly_at_eps_never_merge(dim):
    """1 - cos == eps exactly is not < eps, as in the literal scan (ties at 0.25 and 0.5)."""
    prototypes = dyadic_ties(1200, dim, seed=23)
    distance = cosine_distances(prototypes)
    assert (distance == 0.25).any() and (distance == 0.5).any()  # the ties are there
    assert_matches_naive(prototypes, block_sizes=(1024, 50))


@pytest.mark.parametrize("levels", [0, 63, 127])
def test_every_product_path_gives_the_same_cover(monkeypatch, levels):
    """int8 codes of 8 or 7 bits, or the float product of codes: one and the same result."""
    if levels and uniqueness._int8_code_levels() < levels:
        pytest.skip(f"int8 products of {levels}-level codes are not exact on this machine")
    monkeypatch.setattr(_int8_sketch, "_int8_code_levels", lambda: levels)
    prototypes = planted_groups(1200, 64, seed=24)
    unit = uniqueness._unit_rows_float64(prototypes)
    assert uniqueness._sketch(unit, [0.1]).int8 == (levels > 0)
    assert_matches_naive(prototypes, block_sizes=(256,))


def spiky_rows(num_rows: int, dim: int, seed: int) -> torch.Tensor:
    """Hard rows for one quantisation step: near-axes, constant rows, mixed scales."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    axes = torch.arange(num_rows // 4) % dim
    rows[: num_rows // 4] *= 1e-3
    rows[torch.arange(num_rows // 4), axes] += 1.0
    rows[num_rows // 4 : num_rows // 3] = 1.0
    rows[num_rows // 3 : num_rows // 2] *= torch.logspace(-3, 3, dim, dtype=torch.float64)
    return rows


def level_bounds(sketch, level) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K, K]`` lower and upper bounds of every pair's cosine from ``level``'s codes."""
    num_rows = sketch.codes.shape[0]
    codes = sketch.level_codes(level, 0, num_rows)
    products = sketch.matmul(codes, codes).to(torch.float64)
    residual = level.copies * level.rho.double()[:, None] * level.rho.double()[None, :]
    upper = sketch.scale * products + level.bound[None, :]
    lower = sketch.scale * (products - 2 * residual) - level.bound[None, :]
    return lower, upper


@pytest.mark.parametrize("dim", [3, 48, 256])
@pytest.mark.parametrize("levels", [0, 63, 127])
def test_sketch_bounds_every_pair(monkeypatch, dim, levels):
    """lower <= cos(c_i, c_j) <= upper for every pair at every level: the screen is safe.

    Spiky rows, planted (isotropic) and trained-like (decaying spectrum) rows; in d = 256
    every prefix length of the rotated codes is checked, not only the chosen ones.
    """
    if levels and uniqueness._int8_code_levels() < levels:
        pytest.skip(f"int8 products of {levels}-level codes are not exact on this machine")
    monkeypatch.setattr(_int8_sketch, "_int8_code_levels", lambda: levels)
    made = []
    original = _int8_sketch._make_level
    monkeypatch.setattr(
        _int8_sketch, "_make_level", lambda *a: made.append(original(*a)) or made[-1]
    )
    sets = [spiky_rows(200, dim, seed=25), planted_groups(200, dim, seed=26)]
    if dim >= 16:
        sets.append(trained_like(200, dim, seed=27))
    for prototypes in sets:
        unit = uniqueness._unit_rows_float64(prototypes)
        before = unit.clone()
        made.clear()
        sketch = uniqueness._sketch(unit, list(DEFAULT_EPS))
        assert sketch.int8 == (levels > 0 and dim >= 16)  # the patched levels were used
        assert torch.equal(unit, before)  # the rows the float64 checks use stay as they were
        assert len(made) == (13 if dim == 256 else 1)  # prefixes 64, 80, ..., 256
        cosines = unit @ unit.T
        for level in made:
            lower, upper = level_bounds(sketch, level)
            assert bool((lower <= cosines).all()) and bool((cosines <= upper).all())
            if level.length < dim:
                assert level.copies > 0 and level.width >= level.length + level.copies
        # The bound is useful, not vacuous (float codes for tiny d are coarser).
        assert float(sketch.full.bound.max()) < (0.2 if dim >= 16 else 0.5)


@pytest.mark.parametrize("dim", [96, 256])
def test_spiky_rows_match_the_naive_scan(dim):
    """Near-axis, constant and mixed-scale rows: one step suits them all, the cover is exact."""
    assert_matches_naive(spiky_rows(1200, dim, seed=28), block_sizes=(1024, 129))


@pytest.mark.parametrize("maker", ["planted_groups", "trained_like", "random_rows"])
def test_every_prefix_length_gives_the_same_cover(monkeypatch, maker):
    """Whatever prefix each eps screens with (64 coordinates of 256 leave many candidates,
    all 256 none), the cover is the float64 one."""
    prototypes = globals()[maker](1500, 256, seed=29)
    for offset in (0, 3, 12):
        choice = [(offset + e * 4) % 13 for e in range(len(SWEEP_AND_MORE))]
        monkeypatch.setattr(_int8_sketch, "_choose_prefixes", lambda *a, c=choice: c[: len(a[-1])])
        assert_matches_naive(prototypes, block_sizes=(512,))


def test_int8_check_rejects_a_saturating_product(monkeypatch):
    """A kernel that saturates int16 pair sums (pre-VNNI oneDNN) fails the check at 8 bits."""
    exact = torch._int_mm

    def saturating(left, right):
        pairs = left.view(left.shape[0], -1, 2).to(torch.int32) + 128  # u8 after a shift
        weights = right.T.reshape(right.shape[1], -1, 2).to(torch.int32)
        sums = torch.einsum("mkp,nkp->mnk", pairs, weights).clamp(-(2**15), 2**15 - 1)
        return sums.sum(dim=2) - 128 * right.to(torch.int32).sum(dim=0)[None, :]

    assert bool(torch.equal(saturating(*_small_codes(63)), exact(*_small_codes(63))))
    monkeypatch.setattr(torch, "_int_mm", saturating)
    assert uniqueness._int8_matmul_is_exact(63)
    assert not uniqueness._int8_matmul_is_exact(127)


def _small_codes(levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(27)
    left = torch.randint(-levels, levels + 1, (5, 8), generator=gen).to(torch.int8)
    right = torch.randint(-levels, levels + 1, (3, 8), generator=gen).to(torch.int8)
    return left, right.T


def test_one_dimensional_rows():
    """d = 1 (where torch._int_mm is wrong) uses the float product: two directions."""
    prototypes = torch.tensor([[2.0], [-1.0], [3.0], [-0.5]])
    assert unique_prototype_curve(prototypes, [0.5, 2.0]) == {0.5: 2, 2.0: 2}
    assert representatives(prototypes, 0.5).tolist() == [0, 1]


# ---------------------------------------------------------------------------- monotonicity


def nested_clusters(
    num_top: int, num_mid: int, num_leaf: int, seed: int
) -> tuple[torch.Tensor, dict[float, int]]:
    """Three-level hierarchy with exactly known cosine distances, randomly rotated.

    Top-level centres are orthogonal basis vectors (distance 1). Mid-level centres are
    ``sqrt(0.8) top + sqrt(0.2) f`` (distance 0.2 to each other), leaves are
    ``sqrt(0.996) mid + sqrt(0.004) g`` (distance 0.004 to each other), with all ``f``, ``g``
    distinct basis vectors. Leaves of different mid centres are ``1 - 0.8 * 0.996 = 0.2032``
    apart. Every cluster is tighter than each threshold and every gap wider, so the count at
    each threshold is the number of clusters at that level, whatever the order.
    """
    dim = num_top + num_top * num_mid + num_top * num_mid * num_leaf
    eye = torch.eye(dim, dtype=torch.float64)
    next_axis = num_top
    rows = []
    for top in range(num_top):
        for _ in range(num_mid):
            mid = math.sqrt(0.8) * eye[top] + math.sqrt(0.2) * eye[next_axis]
            next_axis += 1
            for _ in range(num_leaf):
                rows.append(math.sqrt(0.996) * mid + math.sqrt(0.004) * eye[next_axis])
                next_axis += 1
    gen = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    scales = 0.5 + torch.rand(len(rows), 1, generator=gen, dtype=torch.float64)
    order = torch.randperm(len(rows), generator=gen)
    prototypes = (torch.stack(rows) @ rotation)[order] * scales
    expected = {
        0.002: num_top * num_mid * num_leaf,
        0.01: num_top * num_mid,
        0.5: num_top,
        1.5: 1,
    }
    return prototypes, expected


@settings(max_examples=25, deadline=None)
@given(
    num_top=st.integers(1, 4),
    num_mid=st.integers(1, 4),
    num_leaf=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    block_size=st.integers(1, 40),
)
def test_nested_clusters_count_each_level_and_shrink_with_eps(
    num_top, num_mid, num_leaf, seed, block_size
):
    prototypes, expected = nested_clusters(num_top, num_mid, num_leaf, seed)
    curve = unique_prototype_curve(prototypes, list(expected), block_size=block_size)
    assert curve == expected
    counts = [curve[eps] for eps in sorted(curve)]
    assert counts == sorted(counts, reverse=True)


def test_count_is_not_monotone_in_eps_in_general():
    """Documented caveat: a larger eps can give more groups under the greedy cover.

    Planar layout near the pole: row 0 at the origin, row 1 at distance 1.5 (in units of
    0.05 radians), rows 2-4 around row 1 at distance ~1.1 and far from row 0 and each
    other. At the small eps row 1 covers rows 2-4 (2 groups); at the larger eps row 0
    swallows row 1, so rows 2-4 become representatives (4 groups).
    """
    planar = torch.tensor([[0, 0], [1.5, 0], [2.6, 0], [1.31, 1.083], [1.31, -1.083]])
    scale = 0.05
    prototypes = torch.cat([torch.ones(5, 1), scale * planar], dim=1).double()
    small, large = 0.0018, 0.0032
    assert unique_prototype_curve(prototypes, [small, large]) == {small: 2, large: 4}
    assert naive_count(prototypes, small) == 2 and naive_count(prototypes, large) == 4


# --------------------------------------------------------------------------- curve and API


def test_curve_equals_per_eps_calls():
    prototypes = random_clustered(500, 40, 12, 0.4, seed=12)
    eps_values = [0.5, 0.025, 0.25, 0.025, 1e-3, 0.1]
    curve = unique_prototype_curve(prototypes, eps_values, block_size=97)
    assert list(curve) == [0.5, 0.025, 0.25, 1e-3, 0.1]  # input order, repeats once
    for eps, count in curve.items():
        assert count == unique_prototypes(prototypes, eps)
        assert count == naive_count(prototypes, eps)


def test_curve_default_eps():
    assert DEFAULT_EPS == (0.025, 0.05, 0.1, 0.25, 0.5)
    prototypes = random_clustered(200, 20, 8, 0.3, seed=13)
    curve = unique_prototype_curve(prototypes)
    assert list(curve) == list(DEFAULT_EPS)
    assert curve == {eps: naive_count(prototypes, eps) for eps in DEFAULT_EPS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_accepted(dtype):
    prototypes = random_clustered(300, 30, 16, 0.2, seed=14).to(dtype)
    for eps in (0.025, 0.1):
        # The reference sees the same (rounded) values, promoted to float64.
        assert unique_prototypes(prototypes, eps) == naive_count(prototypes, eps)


def test_accepts_tensors_that_require_grad():
    prototypes = torch.randn(30, 8, generator=torch.Generator().manual_seed(15))
    prototypes.requires_grad_(True)
    assert unique_prototypes(prototypes) == 30


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("eps", [0.0, -0.1, 2.5, float("nan"), float("inf")])
def test_eps_out_of_range_raises(eps):
    prototypes = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"eps must be in \(0.0, 2.0\]"):
        unique_prototypes(prototypes, eps)
    with pytest.raises(ValueError, match=r"eps_values\[1\]"):
        unique_prototype_curve(prototypes, [0.1, eps])


def test_non_finite_row_is_named():
    prototypes = torch.randn(6, 3)
    prototypes[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"prototypes .*row 3"):
        unique_prototypes(prototypes)
    prototypes[3, 1] = 0.0
    prototypes[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"prototypes .*row 5"):
        unique_prototype_curve(prototypes)


def test_zero_row_is_named():
    prototypes = torch.randn(8, 3)
    prototypes[5] = 0.0
    with pytest.raises(ValueError, match=r"prototypes row 5 is all zeros"):
        unique_prototypes(prototypes)
    with pytest.raises(ValueError, match=r"prototypes row 5 is all zeros"):
        representatives(prototypes)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(5), r"prototypes must have shape \[N, D\], got shape \(5,\)"),
        (torch.randn(2, 3, 4), r"prototypes must have shape \[N, D\]"),
        (torch.zeros(0, 3), r"prototypes must have at least 1 row"),
        (torch.ones(3, 2, dtype=torch.int64), r"prototypes must be a floating-point"),
        ([[1.0, 0.0]], r"prototypes must be a torch.Tensor"),
    ],
)
def test_bad_prototypes_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        unique_prototypes(bad)


def test_bad_eps_values_and_block_size_raise():
    prototypes = torch.randn(4, 3)
    with pytest.raises(ValueError, match="eps_values must contain at least one"):
        unique_prototype_curve(prototypes, [])
    with pytest.raises(ValueError, match="eps_values must be a sequence"):
        unique_prototype_curve(prototypes, 0.1)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        unique_prototypes(prototypes, block_size=0)


# ---------------------------------------------------------------------------------- scale


def test_medium_random_set_is_fast_and_exact():
    """K = 8192 in blocks: all unique at small eps, and few groups at a large eps."""
    prototypes = torch.randn(8192, 32, generator=torch.Generator().manual_seed(16))
    start = time.perf_counter()
    curve = unique_prototype_curve(prototypes, [0.025, 1.5])
    elapsed = time.perf_counter() - start
    assert curve[0.025] == 8192
    assert curve[1.5] == naive_count(prototypes, 1.5)
    assert elapsed < 20.0


@pytest.mark.slow
def test_65536_random_prototypes_are_unique(record_property):
    prototypes = torch.randn(65536, 256, generator=torch.Generator().manual_seed(17))
    start = time.perf_counter()
    count = unique_prototypes(prototypes, 0.025)
    elapsed = time.perf_counter() - start
    record_property("seconds_k65536_d256", elapsed)
    print(f"\nunique_prototypes(K=65536, d=256): {count} in {elapsed:.1f} s")
    assert count == 65536


# --------------------------------------------------------------------------- data reference


def test_data_reference_counts_k_rows_drawn_without_replacement() -> None:
    """The reference is the naive cover of the ``K`` rows a seeded permutation draws; a cap
    of the sphere (rows around one direction) counts few at coarse eps, as any K points on it
    must; fewer rows than K are all used."""
    cap = random_clustered(300, 1, 16, 0.5, seed=3)
    curve, drawn = data_reference_curve(cap, 64, (0.025, 0.25), seed=5)
    rows = cap[torch.randperm(300, generator=torch.Generator().manual_seed(5))[:64]]
    assert drawn == 64
    assert curve == {eps: naive_count(rows, eps) for eps in (0.025, 0.25)}
    assert curve[0.25] < 0.4 * 64 and curve[0.025] > curve[0.25]
    assert data_reference_curve(cap, 64, (0.025, 0.25), seed=5) == (curve, 64)
    everything, drawn = data_reference_curve(cap[:40], 64, (0.025,))
    assert drawn == 40 and everything == {0.025: naive_count(cap[:40], 0.025)}


def test_data_reference_rejects_bad_input_naming_it() -> None:
    with pytest.raises(ValueError, match="num_prototypes"):
        data_reference_curve(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="embeddings"):
        data_reference_curve(torch.randn(5), 2)
