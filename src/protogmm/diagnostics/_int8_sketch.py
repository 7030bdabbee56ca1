"""The integer sketch of the Definition 2.1 scan: codes whose products bound every cosine.

The unique-prototype count (:mod:`protogmm.diagnostics.uniqueness`, Definition 2.1 of
"Why Prototypes Collapse", Arteaga et al., ICLR 2026) meets every pair of rows once; this
module makes that meeting cheap. Each unit row is rotated into a basis led by the rows'
principal directions (:mod:`protogmm.diagnostics._projection`) and rounded to small integer
codes (:func:`_sketch`). For each eps, a prefix of ``r`` codes and a few columns holding the
norm of the remaining coordinates give, by one exact integer product, an upper and a lower
bound on the float64 cosine of a pair (:class:`_Level`): ``<x, y> <= <x_P, y_P> + |x_R|
|y_R|``. The products run through ``torch._int_mm`` where this machine computes them
exactly (:func:`_int8_code_levels`), else as a float product of the same codes, exact too.
How tight the bounds are only changes how many pairs need the float64 check, never the
result.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from protogmm.diagnostics._projection import (
    _choose_prefixes,
    _coordinate_error,
    _prefix_grid,
    _rotation,
    _sample_rows,
)

# Codes of the float product fallback are integers in [-63, 63] (see _sketch).
_FLOAT_CODE_LEVELS = 63
# Below this dimension the int8 product gains little (and torch._int_mm mishandles d = 1);
# above the other, 127^2 (2 d) could overflow the int32 products.
_INT8_MIN_DIM = 16
_INT8_MAX_DIM = 65536
# Rows rotated and quantised at a time (bounds the float64 temporaries).
_SKETCH_CHUNK = 2048
# Seed of the random codes the int8 product is checked on.
_CHECK_SEED = 20260
# int8 products run fastest with a width that is a multiple of this (zero columns pad it).
_WIDTH_MULTIPLE = 4


@dataclass(frozen=True)
class _Level:
    """The codes one eps is screened with: a prefix of the codes and residual columns.

    For a representative ``i``, a row ``j`` and the exact integer product ``p`` of their
    level codes (:meth:`_Sketch.level_codes`), in float64, rounding included::

        scale * (p - 2 * copies * rho_i * rho_j) - bound_j <= <c_i, c_j> <= scale * p + bound_j

    Attributes:
        length: the coordinates kept (``r``); the rest enter through ``rho``.
        copies: residual columns (``m``), each holding ``rho``; 0 when ``length = d``.
        width: columns of the level codes (``length + copies``, then zero columns).
        rho: ``[K]`` residual codes: ``scale * copies * rho_i * rho_j >= |x_R| |y_R|``.
        bound: ``[K]`` float64 bound on the quantisation and rounding error with row ``j``.
    """

    length: int
    copies: int
    width: int
    rho: Tensor
    bound: Tensor


@dataclass(frozen=True)
class _Sketch:
    """Integer codes of the rotated unit rows and the levels that screen with them.

    Attributes:
        codes: ``[K, d]`` integer-valued codes, int8 when the int8 product is used.
        scale: float64 factor from a code product to an approximate cosine.
        levels: one :class:`_Level` per eps of the scan, in its order.
        full: the level of every coordinate (no residual), for pairs inside a block.
        int8: True when ``codes`` is int8 and products run through ``torch._int_mm``.
    """

    codes: Tensor
    scale: float
    levels: list[_Level]
    full: _Level
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

    def level_codes(self, level: _Level, start: int, stop: int) -> Tensor:
        """``[stop - start, width]`` codes of rows ``start:stop`` at ``level``."""
        if level.width == self.codes.shape[1] and level.copies == 0:
            return self.codes[start:stop]
        out = torch.zeros(stop - start, level.width, dtype=self.codes.dtype)
        out[:, : level.length] = self.codes[start:stop, : level.length]
        out[:, level.length : level.length + level.copies] = level.rho[start:stop, None]
        return out


def _sketch(unit: Tensor, eps_values: list[float]) -> _Sketch:
    """Rotate, quantise, and give each eps the prefix length that screens it fastest.

    The rows ``a`` are rotated, ``z = a O`` (:func:`_rotation`; float32, or float64 where
    float32 matmuls may be reduced-precision), and rounded with one global step to codes
    ``q = round(z / step)``, ``|q| <= L`` (``L`` = 127 or 63, see :func:`_int8_code_levels`).
    For a prefix of ``r`` coordinates, ``a~ = step q[:r]`` and ``e = |z*[:r] - a~|``
    (``z*`` the exact rotation, so ``e`` includes the rotation's rounding error);
    ``<z*_P(x), z*_P(y)> <= <a~_x, a~_y> + |a~_x| e_y + e_x |a~_y| + e_x e_y``, bounded per
    row ``y`` with the largest ``|a~|`` and ``e`` over all rows, and ``|<x, y> - <x O, y
    O>|`` by O's orthogonality defect. The remaining coordinates add at most
    ``|z*_R(x)| |z*_R(y)|`` (Cauchy-Schwarz), held by ``copies`` residual columns of codes
    rounded up. Lower bounds follow the same way.

    Without a usable int8 product the codes stay within 63, so that every partial sum of
    a float32 product of codes (width at most ``2 d``) is an integer below 2**24.

    Args:
        unit: ``[K, d]`` CPU float64 tensor with unit-norm rows.
        eps_values: the thresholds the scan screens for, one level each.

    Returns:
        The sketch; every ``bound`` includes a slack far above every float64 rounding error.
    """
    num_rows, dim = unit.shape
    exact_float32 = torch.get_float32_matmul_precision() == "highest"
    rotation, defect = _rotation(unit)
    work_dtype = torch.float32 if exact_float32 else torch.float64
    levels_max, code_dtype = _code_format(dim, exact_float32)
    grid = _prefix_grid(dim)
    coords = torch.empty(num_rows, dim, dtype=work_dtype)
    for start in range(0, num_rows, _SKETCH_CHUNK):
        stop = start + _SKETCH_CHUNK
        rows = unit[start:stop].to(work_dtype)
        torch.matmul(rows, rotation.to(work_dtype), out=coords[start:stop])
    step = float(coords.abs().max()) / levels_max
    codes, stats = _quantise(coords, step, levels_max, code_dtype, grid)
    del coords
    errors = (_coordinate_error(dim, exact_float32, rotation), defect)
    code_format = (levels_max, code_dtype)
    made = [
        _make_level(length, stats[g], step, code_format, errors, dim)
        for g, length in enumerate(grid)
    ]
    if len(grid) == 1 or num_rows < 2:  # one prefix to choose, or no pair to screen
        chosen = [0] * len(eps_values)
    else:
        sample = _sample_rows(num_rows)
        candidates = [
            (
                level.length,
                level.width,
                level.rho[sample].double() * math.sqrt(level.copies),
                level.bound[sample],
            )
            for level in made
        ]
        thresholds = [1.0 - eps for eps in eps_values]
        chosen = _choose_prefixes(codes[sample].double(), step * step, candidates, thresholds)
    return _Sketch(
        codes=codes,
        scale=step * step,
        levels=[made[g] for g in chosen],
        full=made[-1],
        int8=code_dtype == torch.int8,
    )


def _make_level(
    length: int,
    stats: tuple[Tensor, Tensor, Tensor],
    step: float,
    code_format: tuple[int, torch.dtype],
    errors: tuple[float, float],
    dim: int,
) -> _Level:
    """The level of prefix ``length`` (see :func:`_sketch` for the bounds).

    Args:
        length: coordinates kept.
        stats: ``(|a~|, |z[:r] - a~|, |z[r:]|^2)`` per row, float64, as computed.
        step: the quantisation step.
        code_format: the codes' largest magnitude ``L`` and dtype.
        errors: bound on each coordinate's rotation error, and O's orthogonality defect.
        dim: ``d``.
    """
    norms, residuals, energy = stats
    levels_max, code_dtype = code_format
    coordinate, defect = errors
    residuals = residuals + coordinate * math.sqrt(length)
    # Float64 rounding of the products, norms and the final ``1 - <c_i, c_j> < eps`` test
    # is below 4 d 2**-53 (unit rows); the slack covers it many times over.
    slack = 1e-6 + 4 * dim * 2.0**-53 + defect
    largest_norm, largest_residual = float(norms.amax()), float(residuals.amax())
    bound = largest_norm * residuals + largest_residual * (norms + residuals) + slack
    copies = 0
    rho = torch.zeros(norms.shape[0], dtype=code_dtype)
    if length < dim:
        tail = energy.sqrt()
        tail += coordinate * math.sqrt(dim - length)
        # Enough columns that every rounded-up residual code stays within L.
        copies = max(1, math.ceil((float(tail.amax()) * (1 + 1e-6) / (step * levels_max)) ** 2))
        rho = torch.ceil(tail * ((1 + 1e-9) / (step * math.sqrt(copies)))).to(code_dtype)
    width = length + copies
    if code_dtype == torch.int8 and copies:
        width = -(-width // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
    return _Level(length=length, copies=copies, width=width, rho=rho, bound=bound)


def _code_format(dim: int, exact_float32: bool) -> tuple[int, torch.dtype]:
    """The codes' largest magnitude ``L`` and their dtype.

    int8 where ``torch._int_mm`` is exact here (:func:`_int8_code_levels`); else codes
    within 63 held as float32 where every partial sum of their product stays an integer
    below 2**24 (exact; a level's width is at most 2 d + 17), and as float64 otherwise.
    """
    levels = _int8_code_levels() if _INT8_MIN_DIM <= dim <= _INT8_MAX_DIM else 0
    if levels > 0:
        return levels, torch.int8
    if (2 * dim + 17) * _FLOAT_CODE_LEVELS**2 < 2**24 and exact_float32:
        return _FLOAT_CODE_LEVELS, torch.float32
    return _FLOAT_CODE_LEVELS, torch.float64


def _quantise(
    coords: Tensor, step: float, levels: int, code_dtype: torch.dtype, grid: list[int]
) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """Codes ``q = round(z / step)`` within ``[-L, L]``, and per-prefix norms, chunk by chunk.

    The norms are sums over blocks of ``_BLOCK`` coordinates (``grid``'s step), computed in
    ``z``'s dtype and bounded from above: ``|fl(z - step q) - (z - step q)| <= 2 u (|z| +
    |step q|)`` per coordinate, and a float sum of ``n`` squares errs by at most ``n u``
    relatively (Higham, eq. 3.5), which the factor ``1 + 2 (_BLOCK + 2) u`` and the ``6 u``
    added cover.

    Returns:
        ``(codes, stats)``: ``[K, d]`` codes in ``code_dtype``, and for each prefix length
        ``r`` of ``grid`` float64 ``[K]`` upper bounds on ``|step q[:r]|``, ``|z[:r] -
        step q[:r]|`` and the energy ``|z[r:]|^2`` of the computed ``z``.
    """
    num_rows, dim = coords.shape
    size = math.gcd(*grid)  # the prefix lengths are multiples of the block
    unit_roundoff = torch.finfo(coords.dtype).eps / 2
    codes = torch.empty(num_rows, dim, dtype=code_dtype)
    sums = torch.empty(3, num_rows, dim // size, dtype=torch.float64)
    for start in range(0, num_rows, _SKETCH_CHUNK):
        rows = coords[start : start + _SKETCH_CHUNK]
        stop = start + rows.shape[0]
        # Any integer vector would do as a code (the bound is computed from it); rounding
        # z / step to the nearest one keeps the residual smallest.
        quantised = torch.mul(rows, 1.0 / step).round_().clamp_(-levels, levels)
        codes[start:stop] = quantised
        residual = torch.add(rows, quantised, alpha=-step)
        for part, values in enumerate((quantised, residual, rows)):
            blocks = values.square_() if values is not rows else values.square()
            sums[part, start:stop] = blocks.view(-1, dim // size, size).sum(dim=2)
    inflate = 1.0 + 2 * (size + 2) * unit_roundoff
    columns = torch.tensor(grid) // size - 1
    norms = sums[0].mul_(inflate).cumsum(dim=1)[:, columns].sqrt_().mul_(step)
    residuals = sums[1].mul_(inflate).cumsum(dim=1)[:, columns].sqrt_().add_(6 * unit_roundoff)
    # Energy beyond each prefix: the sum of the later blocks (no cancellation).
    energy = sums[2].mul_(inflate).flip(1).cumsum(dim=1).flip(1)
    tails = torch.cat([energy, torch.zeros(num_rows, 1, dtype=torch.float64)], dim=1)
    tails = tails[:, columns + 1]
    return codes, [(norms[:, g], residuals[:, g], tails[:, g]) for g in range(len(grid))]


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
    generator = torch.Generator().manual_seed(_CHECK_SEED)
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
