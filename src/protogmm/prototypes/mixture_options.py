"""The online mixture's options as one typed value: what ``--model.gmm.*`` parses into.

:class:`MixtureOptions` holds every option of :class:`~protogmm.prototypes.OnlineGMM` but K and
d, typed and checked where the value is made: ``OnlineGMM(K, d, options)`` takes one, the
command-line parser lists and validates them (``protogmm fit --help``) and a YAML config
sets them by name. Python callers may still pass a plain mapping of the options that differ.
A checkpoint stores :meth:`MixtureOptions.overrides` (the options that differ from the
defaults, as plain values), as before.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from protogmm._checks import check_choice, check_in_range, check_positive_int, options_from

__all__ = ["MixtureOptions"]


@dataclass(frozen=True)
class MixtureOptions:
    """Options of the decoupled prototypes' online mixture (see ``OnlineGMM`` for the math).

    Every option is checked when the value is made, so the command-line parser rejects a bad
    one in one line before anything is built.

    Args:
        covariance: ``"diagonal"`` (per-component, per-dimension variances) or
            ``"isotropic"`` (one variance per component).
        forgetting: ``"responsibility"`` (``lambda_k = eta ** n_k``: a component forgets as
            much as it learns and an idle one keeps its estimate), ``"time"`` (``lambda = eta``
            for every component each step, Sato & Ishii 2000) or ``"none"`` (``lambda = 1``).
        eta: retention in (0, 1]; per unit of responsibility for ``"responsibility"`` (memory
            about ``-1 / ln(eta)`` samples per component), per step for ``"time"``.
        mixing: ``"counts"`` (``pi`` from discounted counts) or ``"uniform"`` (``pi = 1/K``,
            an equipartition prior as Sinkhorn-Knopp imposes; the counts are still kept to
            find stranded components).
        mixing_memory: how many expected hits of a component (``N / K`` per step for a
            global batch of ``N`` rows) the mixing counts remember: the per-step discount is
            ``exp(-(N / K) / mixing_memory)``. A per-step discount independent of ``N / K``
            (the former default ``mixing_eta = eta``) remembers less than one hit per
            component at large K, so ``pi`` is noise and a few components take all the
            weight (measured: 40 of 4,096 held 99.999 %).
        mixing_eta: a fixed per-step discount of the mixing counts instead (None: from
            ``mixing_memory``; 1 when ``forgetting="none"``).
        anneal: ``"means"`` (the tempered posterior estimates the means and weights, the
            untempered one the variances) or ``"joint"`` (the tempered posterior estimates
            everything: classic deterministic annealing, which merges the means while beta
            is small).
        beta0: the annealing inverse temperature at step 0, in (0, 1].
        anneal_steps: steps of the cosine ramp of beta from ``beta0`` to 1 (0: no annealing;
            None: the trainer sets it to ``model.gmm_anneal_fraction`` of its schedule's
            steps, and a mixture built outside a trainer takes 1000).
        var_floor: the variance floor ``sigma^2_min`` of the M-step; None: ``1e-2 / d``, one
            hundredth of the per-dimension variance of embeddings spread over the sphere (a
            fixed ``1e-4`` is below that by ``d / 100``, so at ``d = 128`` a component at the
            floor gains ``d/2 ln 78 = 279`` nats of log-determinant over a broad one).
        n_init: pseudo-count given to each component at initialisation.
        init_samples: embeddings collected before initialising (k-means); None: K, at least
            one per component (from fewer rows, the extra means are jittered copies of rows,
            near-duplicates by construction); 0: the first batch, whatever its size. While
            collecting, ``update`` returns uniform responsibilities.
        kmeans_iters: Lloyd iterations after the k-means++ seeding.
        init_restarts: k-means runs at initialisation; the lowest inertia is kept.
        init_variance: the initial variance of every component: ``"pooled"`` within the
            k-means clusters (the variance floor when each cluster holds one row, as with
            the default ``init_samples``; the first updates then estimate it), or
            ``"global"``, the variance of all the embeddings (the former default: it
            includes the spread between clusters, so the first E-steps assign every
            embedding to every component).
        kmeanspp_max_seeds: above this K the sequential k-means++ seeding is replaced by a
            random choice of distinct embeddings (k-means++ costs K sequential passes).
        merge_overlap: merge two components when the Bhattacharyya coefficient of their
            densities exceeds this (two components sharing one cluster: about 0.7; two
            clusters a few standard deviations apart: below 0.1). Candidate pairs are each
            batch row's two most likely components, so the cost stays linear in K. None:
            never merge.
        reseed_min_share: a component whose mixing weight fell below this fraction of its
            expected share ``1/K`` is stranded and re-seeded (None: never). With the
            default ``mixing_memory`` a healthy component falls that low with probability
            about ``exp(-19)``; a component that gets nothing does after about
            ``3 mixing_memory K / N`` steps.
        top_k: truncated EM (the default, 8): each row's E-step and statistics cover only
            its ``top_k`` components by cosine score (the scores the targets need anyway);
            the others get zero responsibility for it. None: every component (the dense
            update, equal to ``top_k = K``, the default before issue 20: same k-NN accuracy
            within seed noise on three seeds of two data sets, fewer unique means; BENCHMARKS.md
            "Truncated EM as the default?"). At least 2 (split and merge's candidate pairs).
        chunk_size: components per chunk of the E-step and statistics products.
        center_momentum: if set, the mixture lives on *centred* embeddings: a running mean
            ``m`` of the (unit) embeddings is kept (EMA with this momentum) and every input
            is mapped to ``(h - m) / ||h - m||``. None: no centring.
        seed: seed of the generator used for initialisation (independent of the global RNG,
            so fitting the mixture does not perturb training's random stream).

    Raises:
        ValueError: one line naming the first option out of its range or choices.
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
    top_k: int | None = 8
    chunk_size: int = 4096
    center_momentum: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("covariance", self.covariance, ("diagonal", "isotropic"))
        check_choice("forgetting", self.forgetting, ("responsibility", "time", "none"))
        check_choice("mixing", self.mixing, ("counts", "uniform"))
        check_choice("anneal", self.anneal, ("means", "joint"))
        check_choice("init_variance", self.init_variance, ("pooled", "global"))
        check_in_range("eta", self.eta, 0.0, 1.0, low_inclusive=False)
        check_in_range("beta0", self.beta0, 0.0, 1.0, low_inclusive=False)
        for name in ("mixing_memory", "n_init"):
            check_in_range(name, getattr(self, name), 0.0, math.inf, low_inclusive=False)
        for name, high in (
            ("mixing_eta", 1.0),
            ("var_floor", math.inf),
            ("merge_overlap", 1.0),
            ("reseed_min_share", 1.0),
        ):
            if getattr(self, name) is not None:
                check_in_range(name, getattr(self, name), 0.0, high, low_inclusive=False)
        if self.center_momentum is not None:
            check_in_range("center_momentum", self.center_momentum, 0.0, 1.0, high_inclusive=False)
        for name, minimum in (("anneal_steps", 0), ("init_samples", 0), ("top_k", 2)):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), minimum=minimum)
        for name, minimum in (("kmeans_iters", 0), ("init_restarts", 1)):
            check_positive_int(name, getattr(self, name), minimum=minimum)
        for name in ("kmeanspp_max_seeds", "chunk_size"):
            check_positive_int(name, getattr(self, name))

    @classmethod
    def coerce(cls, value: MixtureOptions | Mapping[str, Any] | None) -> MixtureOptions:
        """Options from a ``MixtureOptions``, a mapping of options (only those that differ
        from the defaults, as checkpoints and Python callers pass them) or None (defaults).

        Raises:
            ValueError: one line naming an unknown option and listing the known ones.
        """
        return options_from(cls, value, "model.gmm")

    def overrides(self) -> dict[str, Any]:
        """The options that differ from the defaults (empty: all defaults)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != field.default
        }
