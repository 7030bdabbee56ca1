"""What every host shares: the paper's three steps, written once (:meth:`Host.step`).

1. the EMA teacher embeds the views (no gradient);
2. the prototypes are fitted to those embeddings (paper eq. 2; decoupled only, before the
   student sees them, and they never receive a gradient);
3. the encoder is trained against them as fixed targets (paper eq. 3): the teacher's targets,
   then the student's scores and the host's loss.

A host (:mod:`~protogmm.hosts.dino`, :mod:`~protogmm.hosts.ibot`, :mod:`~protogmm.hosts.carp`)
fills in what differs: which views the teacher embeds, its targets, and its loss. It owns its
options and its objectives (DINO's centre, iBOT's masks, CARP's partitions); the student,
teacher and prototypes it is handed in a :class:`StepContext`. Pure PyTorch: no Lightning.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from protogmm.objectives.balancing import sinkhorn_knopp
from protogmm.prototypes.kinds import Decoupled, PrototypeKind
from protogmm.prototypes.sets import PrototypeSets
from protogmm.specs import ConfigSpec

__all__ = ["Host", "StepContext", "StepOutput", "TeacherOutput", "Targets", "embed"]

#: Views per step the teacher sees (DINO's two global crops).
NUM_GLOBAL_VIEWS = 2


@dataclass
class StepContext:
    """What one training step hands the host.

    Attributes:
        student: the student's ``backbone`` and ``head`` (and joint prototypes).
        teacher: the EMA teacher's, same layout.
        prototypes: which set each network scores against (resolved once per run).
        schedule: this step's per-step hyperparameters (temperatures, ...).
        step: the optimizer step (the host's own random draws are seeded by it).
        rank: this process's rank (each rank draws its own).
        micro_batch: the micro-batch within the optimizer step under gradient
            accumulation (0 without it): each draws its own.
    """

    student: nn.ModuleDict
    teacher: nn.ModuleDict
    prototypes: PrototypeSets
    schedule: dict[str, float]
    step: int = 0
    rank: int = 0
    micro_batch: int = 0


@dataclass
class TeacherOutput:
    """Step 1's result: the teacher's embeddings of the global views.

    Attributes:
        embeddings: ``[2B, d]`` (iBOT: the [CLS] tokens').
        patches: iBOT: every patch embedding ``[2B, P, d]``.
        masks: iBOT: this step's block masks ``[2B, h, w]`` (True = masked for the student).
        patch_sample: iBOT, decoupled: the bounded random subset of patch embeddings that
            the mixture is fitted to.
        scores: ``[2B, K]`` cosine scores of ``embeddings`` against the fitted prototypes,
            where fitting them computed these anyway (truncated EM), else None.
    """

    embeddings: Tensor
    patches: Tensor | None = None
    masks: Tensor | None = None
    patch_sample: Tensor | None = None
    scores: Tensor | None = None


@dataclass
class Targets:
    """Step 3's teacher side: what the student is trained to match.

    Attributes:
        probs: the [CLS] targets ``[2, B, K]`` (also what the logs measure).
        scores: CARP: the teacher's raw scores ``[2, B, K]`` (its objective softmaxes them
            per block), else None.
        patches: iBOT: the targets at the masked patches ``[M, K_p]``.
    """

    probs: Tensor
    scores: Tensor | None = None
    patches: Tensor | None = None


@dataclass
class StepOutput:
    """The host's loss, its targets and its own metrics (``train/...``)."""

    loss: Tensor
    targets: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Host(ConfigSpec, nn.Module):
    """A self-supervised method that trains an encoder against prototypes (base class).

    Subclasses set :attr:`name`, keep each constructor argument as a same-named attribute
    (:meth:`spec` records them), build their objectives in :meth:`setup`, and implement the
    three hooks :meth:`embed_teacher`, :meth:`teacher_targets` and :meth:`student_loss`.
    """

    #: Whether the student sees masked patches (the ViT's mask token is trained).
    masks_patches: bool = False

    def __init__(self) -> None:
        nn.Module.__init__(self)

    # ------------------------------------------------------------------ building
    def setup(self, num_prototypes: int, kind: PrototypeKind, encoder: nn.Module) -> None:
        """Check this host against the rest of the model and build its objectives.

        Raises:
            ValueError: one line naming the option that does not fit.
        """

    def patch_set_size(self, num_prototypes: int) -> int | None:
        """K of a separate patch set (iBOT), or None: the host scores no patch tokens."""
        return None

    def schedule_at(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        """The host's own per-step hyperparameters (a pure function of the step)."""
        return {}

    # ------------------------------------------------------------------ one step
    def step(self, ctx: StepContext, views: list[Tensor]) -> StepOutput:
        """One training step: the paper's three steps, the same for every host."""
        # 1. The EMA teacher embeds the global views (no gradient).
        with torch.no_grad():
            teacher = self.embed_teacher(ctx, views)

        # 2. Decoupled: the mixture is fitted to the teacher's embeddings first (paper eq. 2);
        #    joint and partial prototypes are fitted by gradient instead (step 3). A truncated
        #    fit scores the teacher against the prototypes anyway: the scores are kept.
        posterior, teacher.scores = ctx.prototypes.fit(
            teacher.embeddings, teacher.patch_sample, self.wants_posterior(ctx.prototypes.kind)
        )

        # 3. The encoder is trained against the now fixed prototypes (paper eq. 3): the
        #    teacher's targets, then the student's scores and the host's loss.
        targets = self.teacher_targets(ctx, teacher, posterior)
        return self.student_loss(ctx, views, teacher, targets)

    def embed_teacher(self, ctx: StepContext, views: list[Tensor]) -> TeacherOutput:
        """Step 1 (called without gradient): the teacher's embeddings of the global views."""
        return TeacherOutput(embed(ctx.teacher, views[:NUM_GLOBAL_VIEWS]))

    def teacher_targets(
        self, ctx: StepContext, teacher: TeacherOutput, posterior: Tensor | None
    ) -> Targets:
        """Step 3, teacher side: the targets over the fixed prototypes."""
        raise NotImplementedError

    def student_loss(
        self, ctx: StepContext, views: list[Tensor], teacher: TeacherOutput, targets: Targets
    ) -> StepOutput:
        """Step 3, student side: its scores against the same prototypes, and the loss."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces
    def step_seed(self, ctx: StepContext, purpose: str) -> int:
        """A seed for this step's own draws: a hash of (purpose, seed, rank, step).

        Independent of the global RNGs (the augmentations' stream does not shift), identical
        on resume, different on each DDP rank and each accumulated micro-batch.
        """
        key = f"{purpose}/{getattr(self, 'seed', 0)}/{ctx.rank}/{ctx.step}"
        if ctx.micro_batch:  # without accumulation the key (and the draws) stay as before
            key += f"/{ctx.micro_batch}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1

    @staticmethod
    def student_scores(ctx: StepContext, views: list[Tensor]) -> Tensor:
        """The student embeds every view and is scored against the same (fixed) prototypes:
        ``[V, B, K]``."""
        scores = ctx.prototypes.student(embed(ctx.student, views))
        return scores.view(len(views), views[0].shape[0], -1)

    @staticmethod
    @torch.no_grad()
    def posterior_targets(kind: PrototypeKind, posterior: Tensor) -> Tensor:
        """Targets from the mixture's posterior: tempered, optionally Sinkhorn-balanced."""
        assert isinstance(kind, Decoupled)
        logits = posterior.clamp_min(1e-30).log() / kind.posterior_temperature
        if kind.target_balancing == "sinkhorn":
            return sinkhorn_knopp(logits)
        return torch.softmax(logits, dim=1)

    @staticmethod
    def wants_posterior(kind: PrototypeKind) -> bool:
        """Decoupled with ``targets="posterior"``: the mixture's posterior is the target."""
        return isinstance(kind, Decoupled) and kind.targets == "posterior"


def embed(net: nn.ModuleDict, views: list[Tensor]) -> Tensor:
    """L2-normalised bottleneck embeddings ``[V * B, d]`` of views, grouped by resolution."""
    return net["head"](backbone_features(net, views))


def backbone_features(net: nn.ModuleDict, views: list[Tensor]) -> Tensor:
    """Backbone features ``[V * B, D]``; views of one size go through together (DINO's
    ``MultiCropWrapper``)."""
    features, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        features.append(net["backbone"](torch.cat(views[start:end])))
        start = end
    return torch.cat(features)
