"""iBOT (Zhou et al. 2022): DINO on [CLS] + masked-patch self-distillation (its Eq. 3)."""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor, nn

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.data.masking import BlockMasking, check_ratio_range
from protogmm.hosts.base import (
    NUM_GLOBAL_VIEWS,
    StepContext,
    StepOutput,
    Targets,
    TeacherOutput,
    backbone_features,
)
from protogmm.hosts.dino import DINO
from protogmm.objectives import IBOTPatchLoss
from protogmm.prototypes.kinds import PrototypeKind
from protogmm.schedules import linear_ramp

__all__ = ["IBOT"]


class IBOT(DINO):
    """iBOT's step: DINO over [CLS] pairs plus the masked-patch cross-entropy.

    The student sees the global views with block-masked patches (replaced by the ViT's mask
    token) and predicts, at the masked positions, the teacher's targets for the unmasked
    patches. Patch prototypes are shared with [CLS] or separate (iBOT's second last layer;
    decoupled: their own mixture, fitted to a bounded random subset of the teacher's patch
    embeddings). Needs a backbone with patch tokens (``vit*``, ``timm:vit_*``).

    Args:
        mask_ratio: range of the per-image prediction ratio, in ``[0, 1)`` (iBOT 0.1-0.5).
        mask_probability: chance that an image is masked at all (iBOT 0.5).
        mask_min_aspect: smallest aspect ratio of a mask block (iBOT 0.3).
        patch_prototypes: ``"separate"`` (the patch tokens have their own set) or
            ``"shared"`` (the [CLS] set; decoupled: one mixture fitted to both).
        num_patch_prototypes: separate only: K of the patch set (default: K).
        patch_weight: weight of the patch loss (iBOT's lambda2, 1).
        teacher_patch_temperature: patch tau_t after warm-up (iBOT 0.07).
        warmup_teacher_patch_temperature: patch tau_t at step 0 (iBOT 0.04), warmed up over
            ``teacher_temperature_warmup_epochs`` as the [CLS] one; with their default of 0
            (DINO's host; iBOT's own is 30) the patch tau_t is ``teacher_patch_temperature``
            from step 0.
        patch_mixture_samples: decoupled: at most this many teacher patch embeddings (a
            seeded random subset) update the mixture per step.
        seed: seed of the masks and the patch subset, independent of the global RNGs so
            that they do not shift the augmentations' random stream.
        **dino_options: :class:`~protogmm.hosts.DINO`'s options (its temperatures: the
            teacher-temperature warm-up also ramps the patch temperature, and its centre
            momentum is the patch centre's too).
    """

    name = "ibot"
    masks_patches = True

    def __init__(
        self,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        mask_min_aspect: float = 0.3,
        patch_prototypes: str = "separate",
        num_patch_prototypes: int | None = None,
        patch_weight: float = 1.0,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        patch_mixture_samples: int = 4096,
        seed: int = 0,
        **dino_options: Any,
    ) -> None:
        super().__init__(**dino_options)
        check_ratio_range("model.host.mask_ratio", mask_ratio)
        check_in_range("model.host.mask_probability", mask_probability, 0.0, 1.0)
        check_in_range("model.host.mask_min_aspect", mask_min_aspect, 0.0, 1.0, low_inclusive=False)
        check_choice("model.host.patch_prototypes", patch_prototypes, ("shared", "separate"))
        if num_patch_prototypes is not None:
            check_positive_int("model.host.num_patch_prototypes", num_patch_prototypes)
            if patch_prototypes == "shared":
                raise ValueError(
                    "model.host.num_patch_prototypes: only with patch_prototypes='separate' "
                    f"(shared patch prototypes are the [CLS] set), got {num_patch_prototypes!r}"
                )
        check_in_range("model.host.patch_weight", patch_weight, 0.0, math.inf)
        for key, value in (
            ("teacher_patch_temperature", teacher_patch_temperature),
            ("warmup_teacher_patch_temperature", warmup_teacher_patch_temperature),
        ):
            check_in_range(f"model.host.{key}", value, 0.0, math.inf, low_inclusive=False)
        check_positive_int("model.host.patch_mixture_samples", patch_mixture_samples)
        _check_seed(seed)
        self.mask_ratio = tuple(mask_ratio)
        self.mask_probability = mask_probability
        self.mask_min_aspect = mask_min_aspect
        self.patch_prototypes = patch_prototypes
        self.num_patch_prototypes = num_patch_prototypes
        self.patch_weight = patch_weight
        self.teacher_patch_temperature = teacher_patch_temperature
        self.warmup_teacher_patch_temperature = warmup_teacher_patch_temperature
        self.patch_mixture_samples = patch_mixture_samples
        self.seed = seed
        self.patch_objective: IBOTPatchLoss | None = None
        self.masking: BlockMasking | None = None

    def patch_set_size(self, num_prototypes: int) -> int | None:
        if self.patch_prototypes == "shared":
            return None
        return self.num_patch_prototypes or num_prototypes

    def setup(self, num_prototypes: int, kind: PrototypeKind, encoder: nn.Module) -> None:
        if not getattr(encoder, "patch_tokens", False):
            raise ValueError(
                "model.host: IBOT needs a backbone with patch tokens (vit, vit_t, vit_s, "
                f"timm:vit_*), got {type(encoder).__name__}"
            )
        super().setup(num_prototypes, kind, encoder)
        self.patch_objective = IBOTPatchLoss(
            self.patch_set_size(num_prototypes) or num_prototypes,
            student_temperature=self.student_temperature,
            center_momentum=self.center_momentum,
        )
        self.masking = BlockMasking(
            (encoder.grid_size, encoder.grid_size),
            ratio=self.mask_ratio,
            probability=self.mask_probability,
            min_aspect=self.mask_min_aspect,
        )

    def schedule_at(self, step: int, steps_per_epoch: int) -> dict[str, float]:
        warmup_steps = int(self.teacher_temperature_warmup_epochs * steps_per_epoch)
        patch_temperature = linear_ramp(
            step,
            warmup_steps,
            self.warmup_teacher_patch_temperature,
            self.teacher_patch_temperature,
        )
        return super().schedule_at(step, steps_per_epoch) | {
            "teacher_patch_temperature": patch_temperature
        }

    # ------------------------------------------------------------------ the three hooks
    def embed_teacher(self, ctx: StepContext, views: list[Tensor]) -> TeacherOutput:
        """The unmasked global views' [CLS] ``[2B, d]`` and patches ``[2B, P, d]``, this
        step's masks, and (decoupled) the patch rows the mixture is fitted to."""
        global_views = torch.cat(views[:NUM_GLOBAL_VIEWS])
        masks = self.masks(ctx, global_views.shape[0]).to(global_views.device)
        cls_tokens, patches = embed_tokens(ctx.teacher, global_views)
        sample = self.sample_patches(ctx, patches) if ctx.prototypes.mixture is not None else None
        return TeacherOutput(cls_tokens, patches, masks, sample)

    def teacher_targets(
        self, ctx: StepContext, teacher: TeacherOutput, posterior: Tensor | None
    ) -> Targets:
        """DINO's targets for [CLS], iBOT's at the masked patch positions."""
        # The scores the fit computed (truncated EM) serve the [CLS] targets, as in DINO.
        scores, teacher.scores = teacher.scores, None
        cls_targets = self.cls_targets(ctx, teacher.embeddings, posterior, scores)  # [2, B, K]
        assert teacher.patches is not None and teacher.masks is not None
        patch_targets = self.patch_targets(ctx, teacher.patches, teacher.masks)  # [M, K_p]
        return Targets(cls_targets, patches=patch_targets)

    def student_loss(
        self, ctx: StepContext, views: list[Tensor], teacher: TeacherOutput, targets: Targets
    ) -> StepOutput:
        assert self.objective is not None and self.patch_objective is not None
        masks, batch_size = teacher.masks, views[0].shape[0]
        assert masks is not None and targets.patches is not None
        # The student embeds the masked global views ([CLS], and the patches at the masked
        # positions) and the local views ([CLS]).
        student_cls, student_patches = embed_tokens(
            ctx.student,
            torch.cat(views[:NUM_GLOBAL_VIEWS]),
            masks,
            views[NUM_GLOBAL_VIEWS:],
        )
        patch_scores = ctx.prototypes.student_patch(student_patches)  # [M, K_p]
        # DINO over [CLS] pairs + the masked-patch cross-entropy (lambda1 = 1, lambda2).
        cls_loss = self.cls_loss(ctx, student_cls, targets.probs)
        patch_loss = self.patch_objective(
            patch_scores, targets.patches, masks.view(NUM_GLOBAL_VIEWS, batch_size, -1)
        )
        return StepOutput(
            cls_loss + self.patch_weight * patch_loss,
            targets.probs,
            {
                "train/cls_loss": cls_loss.detach(),
                "train/patch_loss": patch_loss.detach(),
                "train/masked_fraction": masks.float().mean(),
            },
        )

    # ------------------------------------------------------------------ iBOT's pieces
    @torch.no_grad()
    def patch_targets(self, ctx: StepContext, patches: Tensor, masks: Tensor) -> Tensor:
        """iBOT's patch targets ``[M, K_p]`` at the masked positions (``masks`` ``[N, h, w]``).

        Centred with the patch centre and sharpened with the patch temperature (the centre
        moves with all positions), or the patch mixture's posterior (``targets="posterior"``).
        """
        assert self.patch_objective is not None
        masked = masks.flatten(1)
        prototypes = ctx.prototypes
        if prototypes.mixture is not None and self.wants_posterior(prototypes.kind):
            mixture = prototypes.patch_mixture or prototypes.mixture
            posterior = mixture.responsibilities(patches[masked])
            return self.posterior_targets(prototypes.kind, posterior)
        num_images, num_patches, _ = patches.shape
        scores = prototypes.teacher_patch(patches.flatten(0, 1)).view(num_images, num_patches, -1)
        targets = self.patch_objective.teacher_distribution(
            scores[masked], ctx.schedule["teacher_patch_temperature"]
        )
        self.patch_objective.update_center(scores)
        return targets

    def masks(self, ctx: StepContext, num_images: int) -> Tensor:
        """This step's block masks ``[num_images, h, w]`` (bool, True = masked)."""
        assert self.masking is not None
        return self.masking(num_images, random.Random(self.step_seed(ctx, "ibot-mask")))

    @torch.no_grad()
    def sample_patches(self, ctx: StepContext, patches: Tensor) -> Tensor:
        """At most ``patch_mixture_samples`` rows of ``patches`` ``[N, P, d]``, seeded."""
        flat = patches.flatten(0, 1)
        if flat.shape[0] <= self.patch_mixture_samples:
            return flat
        generator = torch.Generator().manual_seed(self.step_seed(ctx, "ibot-patch-subset"))
        index = torch.randperm(flat.shape[0], generator=generator)[: self.patch_mixture_samples]
        return flat[index.to(flat.device)]


def embed_tokens(
    net: nn.ModuleDict,
    global_views: Tensor,
    masks: Tensor | None = None,
    local_views: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """iBOT's embeddings: [CLS] ``[N + L * B, d]`` and patches.

    The ``N`` global images go through the ViT's ``forward_tokens``; local views give their
    [CLS] only (iBOT). The projection head is shared by [CLS] and patch tokens (iBOT's
    ``iBOTHead``). Without ``masks``: every patch, ``[N, P, d]``. With ``masks`` (``[N, h,
    w]``, True = replaced by the mask token): only the masked patches, ``[M, d]`` in
    ``masks.nonzero()`` order, since the loss reads nothing else.
    """
    cls_tokens, patch_tokens = net["backbone"].forward_tokens(global_views, mask=masks)
    if local_views:
        cls_tokens = torch.cat([cls_tokens, backbone_features(net, local_views)])
    num_images, num_patches, _ = patch_tokens.shape
    head = net["head"]
    if masks is None:
        patches = head(patch_tokens.flatten(0, 1)).view(num_images, num_patches, -1)
    elif head.use_bn:  # batch norm: statistics over every token, as unmasked
        patches = head(patch_tokens.flatten(0, 1))[masks.flatten()]
    else:  # project the masked tokens alone (about 1/7 of them with iBOT's masks)
        patches = head(patch_tokens[masks.flatten(1)])
    return head(cls_tokens), patches


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"model.host.seed must be an integer, got {seed!r}")
