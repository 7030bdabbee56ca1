"""The online mixture's options as one typed value: what ``--model.gmm.*`` parses into.

:class:`MixtureOptions` holds every keyword option of :class:`~protogmm.prototypes.OnlineGMM`
(all but K and d), typed and with the same defaults (a test compares them), so the
command-line parser lists and validates them (``protogmm fit --help``) and a YAML config
sets them by name. Python callers may still pass a plain mapping of the options that differ.
A checkpoint stores :meth:`MixtureOptions.overrides` (the options that differ from the
defaults, as plain values), as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MixtureOptions"]


@dataclass(frozen=True)
class MixtureOptions:
    """Options of the decoupled prototypes' online mixture (see ``OnlineGMM`` for the math).

    Args:
        covariance: per-component variances per dimension (``diagonal``) or one per
            component (``isotropic``).
        forgetting: ``responsibility`` (a component forgets as much as it learns: eta ** n_k),
            ``time`` (eta per step for every component) or ``none``.
        eta: retention in (0, 1]: per unit of responsibility, or per step for ``time``.
        mixing: mixing weights from discounted counts (``counts``) or equal (``uniform``).
        mixing_memory: expected hits of a component the mixing counts remember.
        mixing_eta: a fixed per-step discount of the mixing counts instead (null: from
            mixing_memory).
        anneal: the tempered posterior estimates the means and weights only (``means``) or
            everything (``joint``: classic deterministic annealing, which merges the means).
        beta0: the annealing inverse temperature at step 0, in (0, 1].
        anneal_steps: steps of beta's cosine ramp to 1 (null: model.gmm_anneal_fraction of
            the schedule's steps; 0: no annealing).
        var_floor: the variances' floor (null: 1e-2 / d).
        n_init: pseudo-count of each component at initialisation.
        init_samples: embeddings collected before the k-means initialisation (null: K; 0:
            the first batch).
        kmeans_iters: Lloyd iterations after the k-means++ seeding.
        init_restarts: k-means runs at initialisation; the lowest inertia is kept.
        init_variance: initial variances ``pooled`` within the k-means clusters or ``global``
            (of all embeddings).
        kmeanspp_max_seeds: above this K the k-means++ seeding is a random choice of rows.
        merge_overlap: merge two components whose Bhattacharyya coefficient exceeds this
            (null: never merge).
        reseed_min_share: re-seed a component whose mixing weight fell below this fraction
            of 1/K (null: never).
        top_k: truncated EM: each row's E-step and statistics cover only its top_k
            components by cosine score, the others get zero responsibility for it (null:
            every component, the dense update; at least 2).
        chunk_size: components per chunk of the E-step and statistics products.
        center_momentum: fit the mixture to centred embeddings, the centre an EMA with this
            momentum (null: no centring).
        seed: seed of the initialisation's own generator.
    """

    covariance: Literal["diagonal", "isotropic"] = "diagonal"
    forgetting: Literal["responsibility", "time", "none"] = "responsibility"
    eta: float = 0.98
    mixing: Literal["counts", "uniform"] = "counts"
    mixing_memory: float = 20.0
    mixing_eta: float | None = None
    anneal: Literal["means", "joint"] = "means"
    beta0: float = 0.1
    anneal_steps: int | None = None
    var_floor: float | None = None
    n_init: float = 1.0
    init_samples: int | None = None
    kmeans_iters: int = 10
    init_restarts: int = 3
    init_variance: Literal["pooled", "global"] = "pooled"
    kmeanspp_max_seeds: int = 4096
    merge_overlap: float | None = 0.5
    reseed_min_share: float | None = 0.05
    top_k: int | None = None
    chunk_size: int = 4096
    center_momentum: float | None = None
    seed: int = 0

    @classmethod
    def coerce(cls, value: MixtureOptions | Mapping[str, Any] | None) -> MixtureOptions:
        """Options from a ``MixtureOptions``, a mapping of options (only those that differ
        from the defaults, as checkpoints and Python callers pass them) or None (defaults).

        Raises:
            ValueError: one line naming an unknown option and listing the known ones.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"model.gmm: expected the mixture's options as a mapping, got {value!r}"
            )
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(
                f"model.gmm: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"OnlineGMM takes {', '.join(known)}"
            )
        return cls(**value)

    def overrides(self) -> dict[str, Any]:
        """The options that differ from the defaults (empty: all defaults)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != field.default
        }

    def gmm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``OnlineGMM(K, d, ...)``: every option, but ``anneal_steps``
        only when it is set (otherwise the trainer sets it from its schedule)."""
        kwargs = dataclasses.asdict(self)
        if kwargs["anneal_steps"] is None:
            del kwargs["anneal_steps"]
        return kwargs
