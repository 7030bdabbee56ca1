"""How much of the prototype set a pass of data uses.

Geometric uniqueness (Definition 2.1 of "Why Prototypes Collapse", Arteaga et al., ICLR
2026) asks whether prototypes are distinct; usage asks whether the data is assigned to
them (paper notes §4: track the two separately). Over ``N`` samples with assignment
probabilities ``p_n`` (rows of an ``[N, K]`` matrix, e.g. the teacher's softmax or the
mixture's responsibilities):

* ``ever_chosen``: the number of prototypes that are ``argmax_k p_nk`` for at least one
  ``n`` (ties go to the lowest index, as ``torch.argmax``);
* ``marginal_entropy``: ``H(p_bar) = -sum_k p_bar_k log p_bar_k`` in nats, with the mean
  assignment ``p_bar = (1/N) sum_n p_n`` (DINO's collapse monitor; ``log K`` when the data
  is spread evenly, ``0`` when one prototype takes everything);
* ``effective_number``: ``exp(H(p_bar))``, between 1 and ``K``;
* ``mean_sample_entropy``: ``(1/N) sum_n H(p_n)``, how sharp single assignments are.

``0 log 0`` is taken as ``0``. :class:`UsageAccumulator` streams a loader batch by batch in
``O(K)`` memory; :func:`prototype_usage` is the one-shot form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from protogmm._checks import check_matrix, check_positive_int

__all__ = ["UsageAccumulator", "prototype_usage"]

# Largest |sum_k p_nk - 1| accepted for a row of probabilities (float16 softmax rows of a
# few thousand entries stay well inside).
_ROW_SUM_TOLERANCE = 1e-2


class UsageAccumulator:
    """Streamed prototype usage over batches of assignments (see the module docstring).

    Keeps ``O(K)`` running sums on the device of the first batch (float64, float32 on MPS):
    the summed assignment ``sum_n p_n``, the argmax counts and ``sum_n H(p_n)``.

    Args:
        num_prototypes: ``K``; if None it is taken from the first ``[B, K]`` batch (then
            1-D batches of hard assignments need an earlier 2-D batch or this argument).

    Example:
        >>> acc = UsageAccumulator(num_prototypes=4)
        >>> acc.update(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
        >>> acc.update(torch.tensor([2]))
        >>> acc.compute()["ever_chosen"]
        2
    """

    def __init__(self, num_prototypes: int | None = None) -> None:
        if num_prototypes is not None:
            check_positive_int("num_prototypes", num_prototypes)
        self.num_prototypes = num_prototypes
        self.num_samples = 0
        self._mass: Tensor | None = None  # [K] sum_n p_n
        self._chosen: Tensor | None = None  # [K] argmax counts
        self._entropy_sum: Tensor | None = None  # scalar sum_n H(p_n)

    def update(self, assignments: Tensor) -> None:
        """Add a batch.

        Args:
            assignments: ``[B, K]`` probabilities (each row non-negative, summing to 1
                within 1e-2; apply a softmax to raw scores first) or ``[B]`` integer hard
                assignments in ``[0, K)`` (one-hot rows, sample entropy 0).

        Raises:
            ValueError: naming ``assignments`` on a wrong shape, dtype, column count,
                non-finite or negative entry, a row not summing to 1, or an index outside
                ``[0, K)``; or if ``K`` is unknown for 1-D assignments.
        """
        self._add(assignments, "assignments")

    def compute(self) -> dict[str, float]:
        """Return the usage statistics of every sample seen so far.

        Returns:
            ``{"num_prototypes": K, "num_samples": N, "ever_chosen": int,
            "marginal_entropy": nats, "effective_number": exp(entropy),
            "mean_sample_entropy": nats}``.

        Raises:
            ValueError: if no sample was added yet.
        """
        if self._mass is None or self._chosen is None or self._entropy_sum is None:
            raise ValueError("UsageAccumulator.compute() needs at least one sample, got none")
        mean = (self._mass / self.num_samples).double().cpu()
        # Guard against rounding drift in long streams: renormalise the mean assignment.
        mean = mean / mean.sum()
        marginal_entropy = float(-torch.special.xlogy(mean, mean).sum())
        return {
            "num_prototypes": int(self._mass.shape[0]),
            "num_samples": self.num_samples,
            "ever_chosen": int((self._chosen > 0).sum()),
            "marginal_entropy": marginal_entropy,
            "effective_number": math.exp(marginal_entropy),
            "mean_sample_entropy": float(self._entropy_sum.double().cpu()) / self.num_samples,
        }

    # ------------------------------------------------------------------ internals
    def _add(self, assignments: Tensor, name: str) -> None:
        """Add a batch; ``name`` is the caller's argument name, used in error messages."""
        if isinstance(assignments, Tensor) and assignments.ndim == 1:
            self._update_hard(assignments, name)
        else:
            self._update_soft(assignments, name)

    def _update_soft(self, probs: Tensor, name: str) -> None:
        check_matrix(name, probs, cols=self.num_prototypes, min_rows=1, finite=True)
        dtype = _accumulation_dtype(probs.device)
        p = probs.detach().to(dtype)
        if bool((p < 0).any()):
            row = int((p < 0).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"{name} must be non-negative, got a negative entry in row {row}")
        row_error = (p.sum(dim=1) - 1.0).abs()
        if bool((row_error > _ROW_SUM_TOLERANCE).any()):
            row = int((row_error > _ROW_SUM_TOLERANCE).nonzero()[0, 0])
            total = float(p[row].sum())
            raise ValueError(
                f"{name} rows must be probabilities summing to 1 (softmax raw scores "
                f"first), got row {row} summing to {total:.6g}"
            )
        self._ensure_state(p.shape[1], p.device, dtype)
        self._mass += p.sum(dim=0)
        self._chosen += torch.bincount(p.argmax(dim=1), minlength=p.shape[1])
        self._entropy_sum += -torch.special.xlogy(p, p).sum()
        self.num_samples += p.shape[0]

    def _update_hard(self, indices: Tensor, name: str) -> None:
        if self.num_prototypes is None:
            raise ValueError(
                f"{name} given as [B] indices needs num_prototypes (K), got None and no "
                "earlier [B, K] batch"
            )
        k = self.num_prototypes
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"{name} of shape [B] must be integers, got dtype {indices.dtype}")
        if indices.numel() == 0:
            raise ValueError(f"{name} must have at least one row, got shape (0,)")
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= k:
            bad = low if low < 0 else high
            raise ValueError(f"{name} must be in [0, {k}), got an index {bad}")
        dtype = _accumulation_dtype(indices.device)
        counts = torch.bincount(indices.detach().long(), minlength=k)
        self._ensure_state(k, indices.device, dtype)
        self._mass += counts.to(dtype)
        self._chosen += counts
        self.num_samples += indices.shape[0]

    def _ensure_state(self, k: int, device: torch.device, dtype: torch.dtype) -> None:
        if self._mass is None:
            self.num_prototypes = k
            self._mass = torch.zeros(k, device=device, dtype=dtype)
            self._chosen = torch.zeros(k, device=device, dtype=torch.long)
            self._entropy_sum = torch.zeros((), device=device, dtype=dtype)


def prototype_usage(
    assignments_or_scores: Tensor, num_prototypes: int | None = None
) -> dict[str, float]:
    """Usage statistics of a prototype set over one pass of data (see the module docstring).

    Args:
        assignments_or_scores: ``[N, K]`` assignment probabilities (non-negative rows
            summing to 1; raw scores or logits must go through a softmax first, which
            depends on a temperature this function cannot know) or ``[N]`` integer hard
            assignments in ``[0, K)``.
        num_prototypes: ``K``; required for ``[N]`` indices, checked against the columns of
            an ``[N, K]`` input.

    Returns:
        ``{"num_prototypes", "num_samples", "ever_chosen", "marginal_entropy",
        "effective_number", "mean_sample_entropy"}``; entropies in nats.

    Raises:
        ValueError: naming the argument, on bad shapes, dtypes, values or rows that are not
            probabilities (see :meth:`UsageAccumulator.update`).
    """
    accumulator = UsageAccumulator(num_prototypes)
    accumulator._add(assignments_or_scores, "assignments_or_scores")
    return accumulator.compute()


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact-enough sums over long streams; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64
