"""Which prototype set each network scores against: built and resolved once, in one place.

A run has one or two sets of prototypes ([CLS]; iBOT may give its patch tokens their own),
and each is seen by the student and by the teacher. Which object that is depends on the
kind (:mod:`protogmm.prototypes.kinds`):

=============  ==================================  ==================================
kind           student scores against              teacher scores against
=============  ==================================  ==================================
joint          ``student.prototypes`` (learned)    ``teacher.prototypes`` (its EMA)
partial        ``student.prototypes`` (learned)    ``clustering`` (own loss, CAPI)
decoupled      ``gmm`` (online EM, paper eq. 2)    the same ``gmm``
=============  ==================================  ==================================

iBOT's separate patch set lives at ``student.patch.prototypes`` (joint) or ``patch.gmm``
(decoupled); a shared patch set is the [CLS] set. The module names are what checkpoints and
``protogmm diagnose`` have always used, so :func:`add_prototype_modules` keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protogmm.prototypes.base import PrototypeSet
from protogmm.prototypes.gmm import OnlineGMM
from protogmm.prototypes.kinds import Decoupled, Joint, Partial, PrototypeKind
from protogmm.prototypes.learned import LearnedPrototypes

__all__ = ["PrototypeSets", "add_prototype_modules"]


def add_prototype_modules(
    owner: nn.Module,
    student: nn.ModuleDict,
    kind: PrototypeKind,
    num_prototypes: int,
    dim: int,
    num_patch_prototypes: int | None = None,
) -> None:
    """Build the kind's prototype modules under their checkpoint names.

    Call before the teacher is copied from the student (a joint set's teacher copy starts
    as the student's). Sets ``owner.gmm``, ``owner.patch`` and ``owner.clustering`` (None
    where the kind has none).

    Args:
        owner: the module that holds the run (gets ``gmm``, ``patch``, ``clustering``).
        student: the student's modules (gets ``prototypes`` and ``patch.prototypes``).
        kind: how the prototypes are learned.
        num_prototypes: K.
        dim: d, the embedding dimension.
        num_patch_prototypes: iBOT's separate patch set: its K (None: no separate set).
    """
    owner.gmm, owner.patch, owner.clustering = None, None, None
    if isinstance(kind, Joint):  # joint, and the student's side of partial
        student["prototypes"] = LearnedPrototypes(num_prototypes, dim, init_scale=kind.init_scale)
        if num_patch_prototypes is not None:  # iBOT's second last layer (shared_head=False)
            patch = LearnedPrototypes(num_patch_prototypes, dim, init_scale=kind.init_scale)
            student["patch"] = nn.ModuleDict({"prototypes": patch})
        if isinstance(kind, Partial):
            # Outside student and teacher, so the EMA never touches it.
            owner.clustering = LearnedPrototypes(num_prototypes, dim)
        return
    if not isinstance(kind, Decoupled):
        raise ValueError(f"model.prototypes: unknown kind {kind!r}")
    owner.gmm = OnlineGMM(num_prototypes, dim, kind.gmm)
    if num_patch_prototypes is not None:  # decoupled iBOT: the patch tokens' own mixture
        owner.patch = nn.ModuleDict({"gmm": OnlineGMM(num_patch_prototypes, dim, kind.gmm)})


@dataclass(frozen=True)
class PrototypeSets:
    """The sets each network scores against, resolved once from the owner's modules.

    Attributes:
        kind: how the prototypes are learned.
        student: the set the student's [CLS] embeddings are scored against.
        teacher: the set the teacher's [CLS] embeddings are scored against.
        student_patch: iBOT: the student's patch set (the [CLS] set if shared).
        teacher_patch: iBOT: the teacher's patch set (the [CLS] set if shared).
        mixture: decoupled: the [CLS] (or shared) mixture, else None.
        patch_mixture: decoupled iBOT with separate patch prototypes: its mixture, else None.
        clustering: partial: the teacher's clustering layer, else None.
        learned: the student's sets learned by gradient (for the optimizer, KoLeo, freezing).
    """

    kind: PrototypeKind
    student: PrototypeSet
    teacher: PrototypeSet
    student_patch: PrototypeSet
    teacher_patch: PrototypeSet
    mixture: OnlineGMM | None
    patch_mixture: OnlineGMM | None
    clustering: LearnedPrototypes | None
    learned: tuple[LearnedPrototypes, ...]

    @classmethod
    def resolve(
        cls, owner: nn.Module, student: nn.ModuleDict, teacher: nn.ModuleDict, kind: PrototypeKind
    ) -> PrototypeSets:
        """Resolve the roles from the modules :func:`add_prototype_modules` built."""
        mixture = owner.gmm
        patch_mixture = owner.patch["gmm"] if owner.patch is not None else None
        if mixture is not None:
            patch_set = patch_mixture if patch_mixture is not None else mixture
            return cls(
                kind, mixture, mixture, patch_set, patch_set, mixture, patch_mixture, None, ()
            )
        learned = [student["prototypes"]]
        teacher_set = owner.clustering if owner.clustering is not None else teacher["prototypes"]
        student_patch, teacher_patch = learned[0], teacher_set
        if "patch" in student:
            learned.append(student["patch"]["prototypes"])
            student_patch, teacher_patch = learned[1], teacher["patch"]["prototypes"]
        return cls(
            kind,
            learned[0],
            teacher_set,
            student_patch,
            teacher_patch,
            None,
            None,
            owner.clustering,
            tuple(learned),
        )

    @property
    def mixtures(self) -> tuple[OnlineGMM, ...]:
        """Every mixture the run fits (none for joint and partial)."""
        return tuple(m for m in (self.mixture, self.patch_mixture) if m is not None)

    def fit(
        self, cls_rows: Tensor, patch_rows: Tensor | None = None, posterior: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """Paper eq. 2: one online-EM step of each mixture on the teacher's embeddings.

        Args:
            cls_rows: the teacher's [CLS] (or only) embeddings ``[N, d]``.
            patch_rows: iBOT: a bounded sample of its patch embeddings ``[M, d]``; they fit
                the patch mixture, or the shared one together with ``cls_rows``.
            posterior: whether the caller needs the posterior (a truncated mixture's is
                built ``[N, K]`` only then).

        Returns:
            The posterior over the mixture of the ``cls_rows`` ``[N, K]`` (annealed, as the
            update used it; None unless ``posterior``), and the cosine scores of the
            ``cls_rows`` against the fitted prototypes ``[N, K]`` (what ``teacher(cls_rows)``
            returns now) where the update computed them (a truncated mixture, ``top_k``),
            else None. Both None where the prototypes are not a mixture.
        """
        if self.mixture is None:
            return None, None
        shared = patch_rows is not None and self.patch_mixture is None
        rows = torch.cat([cls_rows, patch_rows]) if shared else cls_rows
        fitted = self.mixture.update_and_score(rows.float(), scores=False)
        if patch_rows is not None and self.patch_mixture is not None:
            self.patch_mixture.update_and_score(patch_rows.float(), scores=False)
        n = cls_rows.shape[0]
        scores = None if fitted.scores is None else fitted.scores[:n]
        if not posterior:
            return None, scores
        return fitted.posterior(self.mixture.num_prototypes)[:n], scores

    def fitted(self) -> bool:
        """False while a mixture still waits for its first embeddings."""
        return self.mixture is None or bool(self.mixture.initialized)
