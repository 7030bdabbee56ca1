"""The integer sketch of the Definition 2.1 scan: codes whose products bound every cosine.

The unique-prototype count (:mod:`protogmm.diagnostics.uniqueness`, Definition 2.1 of
"Why Prototypes Collapse", Arteaga et al., ICLR 2026) meets every pair of rows once; this
module makes that meeting cheap. Each unit row is rotated by a fixed orthogonal spreading
and rounded to small integer codes (:func:`_sketch`); the exact integer product of two
rows' codes, scaled, is within a per-row bound of their float64 cosine. The products run
through ``torch._int_mm`` where this machine computes them exactly
(:func:`_int8_code_levels`), else as a float product of the same codes, exact too. How
good the sketch is only changes how many pairs need the float64 check, never the result.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

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
    dim = unit.shape[1]
    # The float32 error bound of the rotation assumes IEEE float32 products and sums; if
    # the user allowed reduced-precision float32 matmuls, rotate in float64 instead.
    exact_float32 = torch.get_float32_matmul_precision() == "highest"
    spread, power, peak, rotation_error = _spread_rows(unit, exact_float32)
    levels, code_dtype = _code_format(dim, exact_float32)
    step = peak / levels
    codes, norms, residuals = _quantise(spread, step, levels, code_dtype)
    # |a~| and |r| of the unit rows: the codes' and residuals' norms, back through M.
    norms *= step
    norms /= math.sqrt(power)
    residuals /= math.sqrt(power)
    residuals += rotation_error

    # Float64 rounding of the products, norms and the final ``1 - <c_i, c_j> < eps`` test
    # is below 4 d 2**-53 (unit rows); the slack covers it many times over.
    slack = 1e-6 + 4 * dim * 2.0**-53
    largest_norm, largest_residual = float(norms.amax()), float(residuals.amax())
    bound = largest_norm * residuals + largest_residual * (norms + residuals) + slack
    int8 = code_dtype == torch.int8
    return _Sketch(codes=codes, scale=step * step / power, bound=bound, int8=int8)


def _spread_rows(unit: Tensor, exact_float32: bool) -> tuple[Tensor, int, float, float]:
    """The rows ``a M`` of :func:`_sketch`, or the rows themselves where ``M = I``.

    Args:
        unit: ``[K, d]`` CPU float64 tensor with unit-norm rows.
        exact_float32: whether float32 matmuls are IEEE (else the rotation runs in float64).

    Returns:
        ``(spread, P, peak, rotation_error)``: the ``[K, d]`` rotated rows (float32 or
        float64; ``unit`` itself when not rotated), the power of two ``P`` with
        ``M M^T = P I``, their largest absolute entry, and a bound on the rounding error of
        ``|a M| / sqrt(P)`` per row (0 when not rotated).
    """
    num_rows, dim = unit.shape
    power = dim & -dim
    # Rows whose largest coordinate is already what isotropic rows have (no more than
    # _SPIKY / sqrt(d)) gain nothing from the rotation: skip it (M = I, P = 1, exact).
    peak = float(torch.linalg.vector_norm(unit, ord=math.inf))
    if power == 1 or peak * math.sqrt(dim) <= _SPIKY:
        return unit, 1, peak, 0.0
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
    peak = float(torch.linalg.vector_norm(spread, ord=math.inf))
    return spread, power, peak, rotation_error


def _code_format(dim: int, exact_float32: bool) -> tuple[int, torch.dtype]:
    """The codes' largest magnitude ``L`` and their dtype.

    int8 where ``torch._int_mm`` is exact here (:func:`_int8_code_levels`); else codes
    within 63 held as float32 where every partial sum of their product stays an integer
    below 2**24 (exact), and as float64 otherwise.
    """
    levels = _int8_code_levels() if _INT8_MIN_DIM <= dim <= _INT8_MAX_DIM else 0
    if levels > 0:
        return levels, torch.int8
    if dim * _FLOAT_CODE_LEVELS**2 < 2**24 and exact_float32:
        return _FLOAT_CODE_LEVELS, torch.float32
    return _FLOAT_CODE_LEVELS, torch.float64


def _quantise(
    spread: Tensor, step: float, levels: int, code_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes ``q = round(a M / step)`` within ``[-L, L]``, chunk by chunk.

    Returns:
        ``(codes, |q|, |a M - step q|)``: ``[K, d]`` codes in ``code_dtype`` and two ``[K]``
        float64 norms per row (not yet divided by ``sqrt(P)``).
    """
    num_rows, dim = spread.shape
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
    return codes, norms, residuals


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
