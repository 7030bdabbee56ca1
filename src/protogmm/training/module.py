"""One LightningModule for prototypical self-supervised learning (DINO, iBOT, CARP hosts).

A reader can follow one training step top to bottom: :meth:`PrototypicalSSL.training_step`
calls the host's step (:meth:`~PrototypicalSSL.dino_step`, :meth:`~PrototypicalSSL.ibot_step`
or :meth:`~PrototypicalSSL.carp_step`, chosen by ``host``), adds KoLeo-proto for joint
prototypes if asked, and logs. The DINO step:

1. the EMA teacher embeds the global views (no gradient);
2. decoupled prototypes only: the online GMM is fitted to those embeddings (paper eq. 2),
   before the student sees them, and never receives a gradient;
3. the teacher's targets: DINO's centred, sharpened softmax over the prototype scores
   (``targets="host"``) or the GMM's annealed posterior (``targets="posterior"``), computed
   once by the GMM's update;
4. the student embeds every view and is scored against the same (fixed) prototypes;
5. the DINO cross-entropy over all (teacher view, other student view) pairs (paper eq. 3);
6. after the optimizer step, the teacher follows the student by EMA.

iBOT adds masked-patch self-distillation on the ViT's patch tokens (patch prototypes shared
with [CLS] or separate; decoupled: a second mixture fitted to a bounded random subset of the
teacher's patch embeddings); CARP replaces the cross-entropy with consistent assignments over
a random partition of the prototypes into blocks (objectives/ibot.py, objectives/carp.py).

Joint prototypes (``prototypes="joint"``) are DINO's weight-normalised last layer, learned by
gradient with the encoder, with an EMA copy in the teacher (the baseline that collapses).
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.data.masking import BlockMasking, check_ratio_range
from protogmm.models import ProjectionHead, build_backbone, make_teacher, update_ema_
from protogmm.objectives import CARPLoss, DINOLoss, IBOTPatchLoss
from protogmm.objectives.balancing import sinkhorn_knopp
from protogmm.prototypes import LearnedPrototypes, MixtureOptions, OnlineGMM, PrototypeSet
from protogmm.prototypes.koleo import koleo_proto_loss
from protogmm.schedules import cosine_ramp, linear_ramp, warmup_cosine
from protogmm.training.distributed import capture_rng_state, restore_rng_state

PrototypeKind = Literal["joint", "decoupled", "partial"]
Targets = Literal["host", "posterior"]

#: Why ``targets="posterior"`` wants ``target_balancing="sinkhorn"`` (measured, BENCHMARKS.md
#: "What we tried" and "Decoupling at small scale").
POSTERIOR_WITHOUT_BALANCING = (
    "model.targets='posterior' with model.target_balancing='none': the GMM posterior is "
    "nearly one-hot (0.12 nats per sample on MNIST-5k vs 4.1 with Sinkhorn) and an early "
    "probe saw the encoder collapse onto 17 of 1024 components; "
    "set model.target_balancing='sinkhorn' unless you are studying this"
)
Balancing = Literal["none", "sinkhorn"]
Host = Literal["dino", "ibot", "carp"]
PatchPrototypes = Literal["shared", "separate"]


class PrototypicalSSL(L.LightningModule):
    """DINO, iBOT or CARP with joint or decoupled (online-GMM) prototypes.

    Schedules are per step and derived from the step alone (so resuming restores them
    exactly): cosine learning rate with linear warm-up, cosine weight decay, cosine teacher
    momentum, linear teacher-temperature warm-up, and the GMM's annealing of beta. They span
    :meth:`schedule_horizon` optimizer steps (the run's, or ``schedule_steps``); the options
    given in epochs count epochs of the real training loader (:meth:`steps_per_epoch`).

    Args:
        backbone: a name known to :func:`protogmm.models.build_backbone`.
        backbone_kwargs: extra keyword arguments of the backbone.
        in_channels: image channels (linked from the data module by the CLI).
        image_size: global-crop size in pixels (linked from the data module by the CLI).
        host: ``"dino"`` (Caron et al. 2021), ``"ibot"`` (Zhou et al. 2022: DINO on [CLS] +
            masked-patch self-distillation; needs a ViT backbone) or ``"carp"`` (Silva &
            Ramírez Rivera 2023: consistent assignments over random prototype partitions).
        prototypes: ``"joint"`` (learned by gradient, DINO), ``"decoupled"`` (online GMM) or
            ``"partial"`` (CAPI-style partial decoupling, Darcet et al. 2025; DINO host only):
            the teacher's prototypes are a separate layer trained by its own clustering loss
            on the (detached) teacher embeddings, never by the encoder's loss, and the
            targets are their Sinkhorn-Knopp-balanced scores; the student's prototypes stay
            joint (learned by the encoder's loss). The baseline between joint and decoupled
            (paper Fig. 3a: CAPI 99.9 % unique at ε = 0.025).
        num_prototypes: K.
        hidden_dim: width of the projection MLP.
        bottleneck_dim: d, the dimension of the L2-normalised embedding scored against the
            prototypes.
        head_layers: layers of the projection MLP.
        head_bn: batch norm in the projection MLP (default on, as lightly's CIFAR DINO and
            CARP: measured on MNIST-5k at init, the ConvNet's embeddings without it sit in a
            small cap of the sphere, mean pairwise cosine 0.85, so any prototypes fitted to
            them are near-duplicates; with it 0.21).
        targets: teacher targets for decoupled prototypes: ``"host"`` (DINO centring and
            sharpening of the scores) or ``"posterior"`` (the GMM posterior, no centring).
        gmm: the options of :class:`protogmm.prototypes.OnlineGMM`
            (:class:`~protogmm.prototypes.MixtureOptions`, or a mapping of those that differ
            from the defaults); ``anneal_steps`` is set from ``gmm_anneal_fraction`` unless
            given.
        gmm_anneal_fraction: fraction of the training steps over which beta anneals to 1.
        posterior_temperature: ``targets="posterior"`` only: the teacher targets are
            ``softmax(log gamma / T)`` (T > 1 softens the nearly one-hot GMM posterior).
        target_balancing: ``targets="posterior"`` only: ``"sinkhorn"`` balances the targets
            over the prototypes with Sinkhorn-Knopp (equipartition, as SwAV/DINOv2), the
            guard against every sample choosing the same few components.
        student_temperature: tau_s.
        teacher_temperature: tau_t at the end of its warm-up.
        warmup_teacher_temperature: tau_t at step 0.
        teacher_temperature_warmup_epochs: epochs of the linear tau_t warm-up.
        center_momentum: DINO's centre EMA momentum.
        lr: peak learning rate (after warm-up).
        min_lr: final learning rate of the cosine decay.
        warmup_epochs: epochs of linear learning-rate warm-up.
        weight_decay: weight decay at step 0 (cosine to ``weight_decay_end``).
        weight_decay_end: final weight decay.
        teacher_momentum: EMA momentum at step 0 (cosine to 1).
        schedule_steps: the horizon of every schedule in optimizer steps (>= 1), instead of
            the run's own length (``trainer.estimated_stepping_batches``): the learning-rate
            cosine, the weight-decay and teacher-momentum cosines and the GMM's annealing
            (``gmm_anneal_fraction`` of it) are laid out for this many steps, and the run
            trains only as many as the trainer runs, so a run of M < N steps is the first M
            steps of an N-step run (DINO's collapse happens in its first 10 of 100 epochs).
            The options in epochs (``warmup_epochs``, ``teacher_temperature_warmup_epochs``,
            ``freeze_prototypes_epochs``) stay in epochs of the real training loader. None:
            the run's length (the default).
        freeze_prototypes_epochs: joint only: the prototype layer gets no update during the
            first epochs (DINO's ``freeze_last_layer``).
        prototype_init_scale: joint (and the student's side of partial) only: factor on the
            initial ``v`` of every jointly learned prototype set (the [CLS] set, iBOT's
            separate patch set; the teacher starts as the student's copy), > 0. The scores
            depend on the directions only and are unchanged, but an AdamW step turns a
            prototype by about ``lr * sqrt(d) / ||v||``. DINO's weight decay (0.04 -> 0.4)
            shrinks ``||v||`` of the last layer to about 0.05-0.25 within its first epochs,
            while nn.Linear's init gives about 0.5 here; 0.1 starts there. 1: nn.Linear's
            init (DINO's). No effect on decoupled prototypes or partial's clustering layer.
        prototype_lr_multiplier: joint (and the student's side of partial) only: the jointly
            learned prototype sets get their own AdamW group, decayed as the other weights,
            whose learning rate is the scheduled one times this factor (> 0; torch's AdamW
            decays by ``lr * weight_decay``, so their decay step scales too). 1: one
            learning rate for all (DINO's), and the optimizer keeps its two groups. No
            effect on decoupled prototypes (buffers) or partial's clustering layer.
        koleo_weight: joint only: weight of KoLeo-proto (Govindarajan et al. 2024) on every
            learned prototype set, added to any host's loss (0: off).
        host_seed: seed of the host's own random draws (iBOT masks and patch-mixture subset,
            CARP partitions), independent of the global RNGs so that they do not shift the
            augmentations' random stream.
        ibot_mask_ratio: iBOT: range of the per-image prediction ratio, in ``[0, 1)`` (iBOT
            0.1-0.5).
        ibot_mask_probability: iBOT: chance that an image is masked at all (iBOT 0.5).
        ibot_mask_min_aspect: iBOT: smallest aspect ratio of a mask block (iBOT 0.3).
        ibot_patch_prototypes: iBOT: ``"separate"`` (the patch tokens have their own set:
            iBOT's second last layer; decoupled, their own mixture) or ``"shared"`` (the
            [CLS] set; decoupled, one mixture fitted to [CLS] and patch embeddings).
        ibot_num_patch_prototypes: iBOT, separate: K of the patch set (default: K).
        ibot_patch_weight: iBOT: weight of the patch loss (iBOT's lambda2, 1).
        teacher_patch_temperature: iBOT: patch tau_t after warm-up (iBOT 0.07).
        warmup_teacher_patch_temperature: iBOT: patch tau_t at step 0 (iBOT 0.04), ramped
            over ``teacher_temperature_warmup_epochs``.
        ibot_patch_gmm_samples: decoupled iBOT: at most this many teacher patch embeddings
            (a seeded random subset) update the patch mixture per step.
        carp_block_size: CARP: prototypes per block P; must divide K (CARP 512 of 65,536).
        carp_temperature: CARP: temperature of the per-block softmax of both networks (our
            scores are cosines; CARP's unnormalised logits carry their own scale).
        carp_entropy_weight: CARP: weight of KL(mean assignment || uniform) per block (1).
        clustering_target_temperature: partial: temperature of the teacher scores before
            Sinkhorn-Knopp (CAPI 0.06); the balanced result is both networks' target.
        clustering_temperature: partial: temperature of the clustering layer's own
            prediction in its loss (CAPI 0.12).
    """

    #: The run's :class:`~protogmm.training.reliability.NonFiniteGuard` (it installs itself
    #: during fit): while its ``skip_step`` is set the step trains nothing.
    step_guard: Any = None

    #: Per optimizer group, by position (set by :meth:`configure_optimizers`): its factor on
    #: the scheduled learning rate, and whether it follows the weight-decay schedule.
    group_schedule: list[tuple[float, bool]]

    def __init__(
        self,
        backbone: str = "convnet",
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 1,
        image_size: int = 28,
        host: Host = "dino",
        prototypes: PrototypeKind = "decoupled",
        num_prototypes: int = 1024,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        head_layers: int = 3,
        head_bn: bool = True,
        targets: Targets = "host",
        gmm: MixtureOptions = MixtureOptions(),  # noqa: B008 (frozen: never mutated)
        gmm_anneal_fraction: float = 0.1,
        posterior_temperature: float = 1.0,
        target_balancing: Balancing = "none",
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        teacher_temperature_warmup_epochs: float = 0.0,
        center_momentum: float = 0.9,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        warmup_epochs: float = 1.0,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        teacher_momentum: float = 0.996,
        schedule_steps: int | None = None,
        freeze_prototypes_epochs: float = 1.0,
        prototype_init_scale: float = 1.0,
        prototype_lr_multiplier: float = 1.0,
        koleo_weight: float = 0.0,
        host_seed: int = 0,
        ibot_mask_ratio: tuple[float, float] = (0.1, 0.5),
        ibot_mask_probability: float = 0.5,
        ibot_mask_min_aspect: float = 0.3,
        ibot_patch_prototypes: PatchPrototypes = "separate",
        ibot_num_patch_prototypes: int | None = None,
        ibot_patch_weight: float = 1.0,
        teacher_patch_temperature: float = 0.07,
        warmup_teacher_patch_temperature: float = 0.04,
        ibot_patch_gmm_samples: int = 4096,
        carp_block_size: int = 128,
        carp_temperature: float = 0.1,
        carp_entropy_weight: float = 1.0,
        clustering_target_temperature: float = 0.06,
        clustering_temperature: float = 0.12,
    ) -> None:
        super().__init__()
        check_choice("model.prototypes", prototypes, ("joint", "decoupled", "partial"))
        check_choice("model.targets", targets, ("host", "posterior"))
        check_positive_int("model.num_prototypes", num_prototypes)
        check_positive_int("model.bottleneck_dim", bottleneck_dim)
        check_positive_int("model.hidden_dim", hidden_dim)
        check_positive_int("model.head_layers", head_layers)
        for name, value in (
            ("model.lr", lr),
            ("model.student_temperature", student_temperature),
            ("model.teacher_temperature", teacher_temperature),
            ("model.warmup_teacher_temperature", warmup_teacher_temperature),
            ("model.clustering_target_temperature", clustering_target_temperature),
            ("model.clustering_temperature", clustering_temperature),
            ("model.prototype_init_scale", prototype_init_scale),
            ("model.prototype_lr_multiplier", prototype_lr_multiplier),
        ):
            check_in_range(name, value, 0.0, math.inf, low_inclusive=False)
        if schedule_steps is not None:
            check_positive_int("model.schedule_steps", schedule_steps)
        check_in_range("model.min_lr", min_lr, 0.0, math.inf)
        for name, value in (
            ("model.weight_decay", weight_decay),
            ("model.weight_decay_end", weight_decay_end),
        ):
            check_in_range(name, value, 0.0, math.inf)
        for name, value in (
            ("model.warmup_epochs", warmup_epochs),
            ("model.teacher_temperature_warmup_epochs", teacher_temperature_warmup_epochs),
            ("model.freeze_prototypes_epochs", freeze_prototypes_epochs),
        ):
            check_in_range(name, value, 0.0, math.inf)
        check_in_range("model.teacher_momentum", teacher_momentum, 0.0, 1.0)
        check_in_range("model.center_momentum", center_momentum, 0.0, 1.0)
        check_in_range("model.gmm_anneal_fraction", gmm_anneal_fraction, 0.0, 1.0)
        check_in_range(
            "model.posterior_temperature", posterior_temperature, 0.0, math.inf, low_inclusive=False
        )
        check_choice("model.target_balancing", target_balancing, ("none", "sinkhorn"))
        if targets == "posterior" and target_balancing == "none" and prototypes == "decoupled":
            warnings.warn(POSTERIOR_WITHOUT_BALANCING, UserWarning, stacklevel=2)
        mixture_options = MixtureOptions.coerce(gmm)
        # Saved as the options that differ from the defaults, in plain values (None: all
        # defaults), as checkpoints have always held them: weights-only loading, and the
        # resume check compares them with older checkpoints'.
        gmm = mixture_options.overrides() or None
        self._check_host_arguments(locals())
        self.save_hyperparameters()

        try:
            encoder = build_backbone(
                backbone,
                in_channels=in_channels,
                image_size=image_size,
                **(backbone_kwargs or {}),
            )
        except ValueError as error:
            raise ValueError(f"model.backbone: {error}") from None
        if host == "ibot" and not getattr(encoder, "patch_tokens", False):
            raise ValueError(
                f"model.host: 'ibot' needs a backbone with patch tokens (vit, vit_t, vit_s, "
                "timm:vit_*), "
                f"got model.backbone={backbone!r}"
            )
        head = ProjectionHead(
            encoder.feature_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=head_layers,
            use_bn=head_bn,
        )
        self.student = nn.ModuleDict({"backbone": encoder, "head": head})
        # iBOT with separate patch prototypes: a second set (named ``patch.prototypes`` and
        # ``patch.gmm``, so `protogmm diagnose` finds them beside the [CLS] set).
        separate_patches = host == "ibot" and ibot_patch_prototypes == "separate"
        num_patch_prototypes = ibot_num_patch_prototypes or num_prototypes
        self.patch: nn.ModuleDict | None = None
        if prototypes in ("joint", "partial"):
            # DINO: the prototypes are the student's last layer; the teacher holds an EMA copy
            # (partial: which the teacher does not use, see ``clustering`` below).
            # Scaled before make_teacher below, so the teacher starts as the student's copy.
            self.student["prototypes"] = LearnedPrototypes(
                num_prototypes, bottleneck_dim, init_scale=prototype_init_scale
            )
            if separate_patches:  # iBOT's second last layer (shared_head=False)
                patch_prototypes = LearnedPrototypes(
                    num_patch_prototypes, bottleneck_dim, init_scale=prototype_init_scale
                )
                self.student["patch"] = nn.ModuleDict({"prototypes": patch_prototypes})
            self.gmm = None
        else:
            # Decoupled (paper Fig. 2b): one mixture shared by teacher and student, buffers only.
            gmm_kwargs = mixture_options.gmm_kwargs()
            self._anneal_from_fraction = mixture_options.anneal_steps is None
            try:
                self.gmm = OnlineGMM(num_prototypes, bottleneck_dim, **gmm_kwargs)
            except (TypeError, ValueError) as error:
                raise ValueError(f"model.gmm: {error}") from None
            if separate_patches:  # decoupled iBOT: the patch tokens' own mixture
                self.patch = nn.ModuleDict(
                    {"gmm": OnlineGMM(num_patch_prototypes, bottleneck_dim, **gmm_kwargs)}
                )
        self.teacher = make_teacher(self.student)
        # Partial (CAPI): the teacher scores against its own layer, trained by the clustering
        # loss alone; outside student and teacher, so the EMA never touches it.
        self.clustering = (
            LearnedPrototypes(num_prototypes, bottleneck_dim) if prototypes == "partial" else None
        )
        if host == "carp":
            self.objective = CARPLoss(
                num_prototypes,
                carp_block_size,
                temperature=carp_temperature,
                entropy_weight=carp_entropy_weight,
                seed=host_seed,
            )
        else:  # DINO, and iBOT's [CLS] loss
            self.objective = DINOLoss(
                num_prototypes,
                student_temperature=student_temperature,
                center_momentum=center_momentum,
            )
        if host == "ibot":
            self.patch_objective = IBOTPatchLoss(
                num_patch_prototypes,
                student_temperature=student_temperature,
                center_momentum=center_momentum,
            )
            self.masking = BlockMasking(
                (encoder.grid_size, encoder.grid_size),
                ratio=ibot_mask_ratio,
                probability=ibot_mask_probability,
                min_aspect=ibot_mask_min_aspect,
            )

    @staticmethod
    def _check_host_arguments(args: dict[str, Any]) -> None:
        """One-line errors naming the key for the host options (before anything is built)."""
        check_choice("model.host", args["host"], ("dino", "ibot", "carp"))
        check_in_range("model.koleo_weight", args["koleo_weight"], 0.0, math.inf)
        if args["koleo_weight"] > 0 and args["prototypes"] == "decoupled":
            raise ValueError(
                "model.koleo_weight: KoLeo-proto regularises jointly learned prototypes; "
                "decoupled prototypes get no gradient (use model.prototypes=joint), got "
                f"{args['koleo_weight']!r}"
            )
        if args["prototypes"] == "partial" and args["host"] != "dino":
            raise ValueError(
                "model.prototypes: 'partial' (CAPI-style) is built for model.host='dino' only, "
                f"got model.host={args['host']!r}"
            )
        if isinstance(args["host_seed"], bool) or not isinstance(args["host_seed"], int):
            raise ValueError(f"model.host_seed must be an integer, got {args['host_seed']!r}")
        check_ratio_range("model.ibot_mask_ratio", args["ibot_mask_ratio"])
        check_in_range("model.ibot_mask_probability", args["ibot_mask_probability"], 0.0, 1.0)
        check_in_range(
            "model.ibot_mask_min_aspect",
            args["ibot_mask_min_aspect"],
            0.0,
            1.0,
            low_inclusive=False,
        )
        check_choice(
            "model.ibot_patch_prototypes", args["ibot_patch_prototypes"], ("shared", "separate")
        )
        if args["ibot_num_patch_prototypes"] is not None:
            check_positive_int("model.ibot_num_patch_prototypes", args["ibot_num_patch_prototypes"])
            if args["ibot_patch_prototypes"] == "shared":
                raise ValueError(
                    "model.ibot_num_patch_prototypes: only with ibot_patch_prototypes="
                    f"'separate' (shared patch prototypes are the [CLS] set), got "
                    f"{args['ibot_num_patch_prototypes']!r}"
                )
        check_in_range("model.ibot_patch_weight", args["ibot_patch_weight"], 0.0, math.inf)
        for name in ("teacher_patch_temperature", "warmup_teacher_patch_temperature"):
            check_in_range(f"model.{name}", args[name], 0.0, math.inf, low_inclusive=False)
        check_positive_int("model.ibot_patch_gmm_samples", args["ibot_patch_gmm_samples"])
        check_positive_int("model.carp_block_size", args["carp_block_size"], minimum=2)
        if args["host"] == "carp" and args["num_prototypes"] % args["carp_block_size"]:
            raise ValueError(
                f"model.carp_block_size must divide model.num_prototypes="
                f"{args['num_prototypes']}, got {args['carp_block_size']}"
            )
        check_in_range(
            "model.carp_temperature", args["carp_temperature"], 0.0, math.inf, low_inclusive=False
        )
        check_in_range("model.carp_entropy_weight", args["carp_entropy_weight"], 0.0, math.inf)

    # ------------------------------------------------------------------ prototype sets
    @property
    def student_prototypes(self) -> PrototypeSet:
        return self.gmm if self.gmm is not None else self.student["prototypes"]

    @property
    def teacher_prototypes(self) -> PrototypeSet:
        if self.clustering is not None:
            return self.clustering
        return self.gmm if self.gmm is not None else self.teacher["prototypes"]

    @property
    def patch_gmm(self) -> OnlineGMM | None:
        """Decoupled iBOT with separate patch prototypes: the patch tokens' own mixture."""
        return self.patch["gmm"] if self.patch is not None else None

    @property
    def student_patch_prototypes(self) -> PrototypeSet:
        """iBOT: the set the student's patch tokens are scored against ([CLS] set if shared)."""
        if self.patch_gmm is not None:
            return self.patch_gmm
        if "patch" in self.student:
            return self.student["patch"]["prototypes"]
        return self.student_prototypes

    @property
    def teacher_patch_prototypes(self) -> PrototypeSet:
        """iBOT: the set the teacher's patch tokens are scored against ([CLS] set if shared)."""
        if self.patch_gmm is not None:
            return self.patch_gmm
        if "patch" in self.teacher:
            return self.teacher["patch"]["prototypes"]
        return self.teacher_prototypes

    def learned_prototype_sets(self) -> list[LearnedPrototypes]:
        """The student's jointly learned sets ([CLS], and iBOT's separate patch set)."""
        if self.gmm is not None:
            return []
        sets = [self.student["prototypes"]]
        if "patch" in self.student:
            sets.append(self.student["patch"]["prototypes"])
        return sets

    def prototypes_fitted(self) -> bool:
        """False while a decoupled mixture still waits for its first embeddings."""
        return self.gmm is None or bool(self.gmm.initialized)

    def prototype_vectors(self) -> Tensor:
        """The ``[K, d]`` unit prototypes the diagnostics measure (the teacher's for joint)."""
        return self.teacher_prototypes.prototypes().detach()

    # ------------------------------------------------------------------ schedules
    def schedule_horizon(self) -> int:
        """Optimizer steps every schedule spans: ``schedule_steps``, else the run's length.

        The one rule for the schedules' ``total_steps`` (learning rate, weight decay, teacher
        momentum, and the GMM's annealing in :meth:`on_fit_start`).
        """
        if self.hparams.schedule_steps is not None:
            return int(self.hparams.schedule_steps)
        return int(self.trainer.estimated_stepping_batches)

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of the real training loader (what schedule epochs mean).

        From the loader's length, not the run's length over ``max_epochs``, which is wrong
        once ``max_steps`` ends the run early (as with a short run under ``schedule_steps``).
        """
        trainer = self.trainer
        batches = trainer.num_training_batches
        if math.isinf(batches):  # not set up yet, or a loader without a length: the estimate
            return max(1, int(trainer.estimated_stepping_batches) // max(1, trainer.max_epochs))
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def schedule_at(self, step: int, total_steps: int, steps_per_epoch: int) -> dict[str, float]:
        """Every per-step hyperparameter at ``step`` (a pure function of the step)."""
        hp = self.hparams
        warmup_steps = int(hp.warmup_epochs * steps_per_epoch)
        tau_warmup_steps = int(hp.teacher_temperature_warmup_epochs * steps_per_epoch)
        return {
            "lr": warmup_cosine(step, total_steps, warmup_steps, hp.lr, hp.min_lr),
            "weight_decay": cosine_ramp(step, total_steps, hp.weight_decay, hp.weight_decay_end),
            "teacher_momentum": cosine_ramp(step, total_steps, hp.teacher_momentum, 1.0),
            "teacher_temperature": linear_ramp(
                step, tau_warmup_steps, hp.warmup_teacher_temperature, hp.teacher_temperature
            ),
            "teacher_patch_temperature": linear_ramp(
                step,
                tau_warmup_steps,
                hp.warmup_teacher_patch_temperature,
                hp.teacher_patch_temperature,
            ),
            "freeze_prototypes": float(step < hp.freeze_prototypes_epochs * steps_per_epoch),
        }

    def _current_schedule(self) -> dict[str, float]:
        return self.schedule_at(self.global_step, self.schedule_horizon(), self.steps_per_epoch())

    def on_fit_start(self) -> None:
        if self.gmm is not None and self._anneal_from_fraction:
            horizon = self.schedule_horizon()
            for mixture in (self.gmm, self.patch_gmm):
                if mixture is not None:
                    mixture.anneal_steps = int(round(self.hparams.gmm_anneal_fraction * horizon))

    def on_train_start(self) -> None:
        # Here, not in on_fit_start: the loader is set up by now, so asking for the run's
        # length does not set it up early (see reliability.DataPosition).
        horizon, run_steps = self.hparams.schedule_steps, self.trainer.estimated_stepping_batches
        if horizon is not None and run_steps > horizon:
            warnings.warn(
                f"model.schedule_steps={horizon} is shorter than this run's {run_steps} "
                "optimizer steps: past it every schedule stays at its final value (teacher "
                "momentum 1: the teacher stops moving)",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ forward passes
    def embed(self, net: nn.ModuleDict, views: list[Tensor]) -> Tensor:
        """L2-normalised bottleneck embeddings ``[V * B, d]`` of views, grouped by resolution."""
        return net["head"](self.backbone_features(net, views))

    @staticmethod
    def backbone_features(net: nn.ModuleDict, views: list[Tensor]) -> Tensor:
        """Backbone features ``[V * B, D]`` of views; views of one size go through together
        (DINO's ``MultiCropWrapper``)."""
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(net["backbone"](torch.cat(views[start:end])))
            start = end
        return torch.cat(features)

    def embed_tokens(
        self,
        net: nn.ModuleDict,
        global_views: Tensor,
        masks: Tensor | None = None,
        local_views: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """iBOT's embeddings: [CLS] ``[N + L * B, d]`` and patches.

        The ``N`` global images go through the ViT's ``forward_tokens``; local views give
        their [CLS] only (iBOT). The projection head is shared by [CLS] and patch tokens
        (iBOT's ``iBOTHead``). Without ``masks``: every patch, ``[N, P, d]``. With ``masks``
        (``[N, h, w]``, True = replaced by the mask token): only the masked patches,
        ``[M, d]`` in ``masks.nonzero()`` order, since the loss reads nothing else.
        """
        cls_tokens, patch_tokens = net["backbone"].forward_tokens(global_views, mask=masks)
        if local_views:
            cls_tokens = torch.cat([cls_tokens, self.backbone_features(net, local_views)])
        num_images, num_patches, _ = patch_tokens.shape
        if masks is None:
            patches = net["head"](patch_tokens.flatten(0, 1)).view(num_images, num_patches, -1)
        elif self.hparams.head_bn:  # batch norm: statistics over every token, as unmasked
            patches = net["head"](patch_tokens.flatten(0, 1))[masks.flatten()]
        else:  # project the masked tokens alone (about 1/7 of them with iBOT's masks)
            patches = net["head"](patch_tokens[masks.flatten(1)])
        return net["head"](cls_tokens), patches

    def forward(self, images: Tensor) -> Tensor:
        """Backbone features of the teacher (the encoder evaluated by k-NN, as in DINO)."""
        return self.teacher["backbone"](images)

    # ------------------------------------------------------------------ one training step
    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        views, _ = batch
        if self.step_guard is not None and self.step_guard.skip_step:
            # Skipped by the guard (non-finite input): a zero loss, no update (see the guard).
            return self.step_guard.skipped_step_loss(self)
        schedule = self._current_schedule()
        if self.hparams.host == "ibot":
            loss, targets, metrics = self.ibot_step(views, schedule)
        elif self.hparams.host == "carp":
            loss, targets, metrics = self.carp_step(views, schedule)
        else:
            loss, targets, metrics = self.dino_step(views, schedule)

        # Joint only: KoLeo-proto pushes every learned prototype from its nearest neighbour.
        if self.hparams.koleo_weight > 0:
            koleo = sum(koleo_proto_loss(p.weight) for p in self.learned_prototype_sets())
            loss = loss + self.hparams.koleo_weight * koleo
            metrics["train/koleo"] = koleo.detach()

        self._log_step(loss, schedule, targets, metrics)
        return loss

    def dino_step(
        self, views: list[Tensor], schedule: dict[str, float]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """DINO: returns the loss, the teacher's targets and the host's extra metrics."""
        n_global, batch_size = 2, views[0].shape[0]

        # 1. The teacher embeds the global views.
        with torch.no_grad():
            teacher_embeddings = self.embed(self.teacher, views[:n_global])  # [2B, d]

        # 2. Decoupled: fit the mixture to the teacher's embeddings first (paper eq. 2).
        posterior = None
        if self.gmm is not None:
            posterior = self.gmm.update(teacher_embeddings.float())

        # 3. The teacher's targets over the (now fixed) prototypes.
        targets = self.dino_targets(teacher_embeddings, posterior, schedule)  # [2, B, K]

        # 4. The student embeds every view and is scored against the same prototypes.
        student_scores = self.student_prototypes(self.embed(self.student, views))
        student_scores = student_scores.view(len(views), batch_size, -1)

        # 5. DINO's cross-entropy over all (teacher view, other student view) pairs (eq. 3).
        loss = self.objective(student_scores, teacher_probs=targets)
        if self.clustering is None:
            return loss, targets, {}

        # 6. Partial (CAPI): the teacher's layer learns to predict its own balanced targets
        #    from the detached teacher embeddings, so no gradient of it reaches the encoder.
        clustering_loss = self.clustering_loss(teacher_embeddings, targets)
        return loss + clustering_loss, targets, {"train/clustering_loss": clustering_loss.detach()}

    def clustering_loss(self, teacher_embeddings: Tensor, targets: Tensor) -> Tensor:
        """Partial: ``CE(targets, softmax(W h / T_c))`` over the teacher rows (CAPI's loss).

        ``h`` is detached, so the only gradient is the clustering layer's ``W``.
        """
        assert self.clustering is not None
        scores = self.clustering(teacher_embeddings.detach().float())  # [2B, K]
        log_probs = torch.log_softmax(scores / self.hparams.clustering_temperature, dim=1)
        return -(targets.reshape(scores.shape) * log_probs).sum(dim=1).mean()

    def ibot_step(
        self, views: list[Tensor], schedule: dict[str, float]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """iBOT: DINO on [CLS] + masked-patch self-distillation (Zhou et al. 2022, Eq. 3)."""
        n_global, batch_size = 2, views[0].shape[0]
        global_views = torch.cat(views[:n_global])
        masks = self.ibot_masks(n_global * batch_size).to(global_views.device)  # [2B, h, w]

        # 1. The teacher embeds the unmasked global views: [CLS] [2B, d], patches [2B, P, d].
        with torch.no_grad():
            teacher_cls, teacher_patches = self.embed_tokens(self.teacher, global_views)

        # 2. Decoupled: fit the mixture(s) first (paper eq. 2); patch embeddings enter as a
        #    bounded random subset (one mixture for both when the prototypes are shared).
        posterior = None
        if self.gmm is not None:
            patch_sample = self.sample_patches(teacher_patches)
            if self.patch_gmm is not None:
                posterior = self.gmm.update(teacher_cls.float())
                self.patch_gmm.update(patch_sample.float())
            else:
                both = torch.cat([teacher_cls, patch_sample]).float()
                posterior = self.gmm.update(both)[: teacher_cls.shape[0]]

        # 3. The teacher's targets: DINO's for [CLS], iBOT's at the masked patch positions.
        cls_targets = self.dino_targets(teacher_cls, posterior, schedule)  # [2, B, K]
        patch_targets = self.ibot_patch_targets(teacher_patches, masks, schedule)  # [M, K_p]

        # 4. The student embeds the masked global views ([CLS], and the patches at the masked
        #    positions) and the local views ([CLS]).
        student_cls, student_patches = self.embed_tokens(
            self.student, global_views, masks, views[n_global:]
        )
        cls_scores = self.student_prototypes(student_cls).view(len(views), batch_size, -1)
        patch_scores = self.student_patch_prototypes(student_patches)  # [M, K_p]

        # 5. DINO over [CLS] pairs + the masked-patch cross-entropy (lambda1 = 1, lambda2).
        cls_loss = self.objective(cls_scores, teacher_probs=cls_targets)
        patch_loss = self.patch_objective(
            patch_scores, patch_targets, masks.view(n_global, batch_size, -1)
        )
        loss = cls_loss + self.hparams.ibot_patch_weight * patch_loss
        return (
            loss,
            cls_targets,
            {
                "train/cls_loss": cls_loss.detach(),
                "train/patch_loss": patch_loss.detach(),
                "train/masked_fraction": masks.float().mean(),
                "train/teacher_patch_temperature": schedule["teacher_patch_temperature"],
            },
        )

    def carp_step(
        self, views: list[Tensor], schedule: dict[str, float]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """CARP: consistent block assignments over a random partition (Silva & Ramírez Rivera)."""
        n_global, batch_size = 2, views[0].shape[0]

        # 1. The teacher embeds the global views.
        with torch.no_grad():
            teacher_embeddings = self.embed(self.teacher, views[:n_global])  # [2B, d]

        # 2. Decoupled: fit the mixture to the teacher's embeddings first (paper eq. 2).
        posterior = None
        if self.gmm is not None:
            posterior = self.gmm.update(teacher_embeddings.float())

        # 3. The teacher's side: scores over the (fixed) prototypes, or the GMM posterior.
        with torch.no_grad():
            if posterior is not None and self.hparams.targets == "posterior":
                teacher_scores = None
                targets = self.posterior_targets(posterior).view(n_global, batch_size, -1)
            else:
                teacher_scores = self.teacher_prototypes(teacher_embeddings)
                teacher_scores = teacher_scores.view(n_global, batch_size, -1)
                targets = torch.softmax(teacher_scores / self.hparams.carp_temperature, dim=-1)

        # 4. The student embeds every view and is scored against the same prototypes.
        student_scores = self.student_prototypes(self.embed(self.student, views))
        student_scores = student_scores.view(len(views), batch_size, -1)

        # 5. This step's random partition into blocks of P; per-block consistency over
        #    cross-view pairs + KL(mean block assignment || uniform).
        partition = self.objective.next_partition()
        if teacher_scores is not None:
            terms = self.objective(student_scores, partition, teacher_scores)
        else:
            terms = self.objective(student_scores, partition, teacher_probs=targets)
        return (
            terms.loss,
            targets,
            {
                "train/consistency": terms.consistency.detach(),
                "train/entropy_kl": terms.entropy.detach(),
            },
        )

    # ------------------------------------------------------------------ targets and draws
    def dino_targets(
        self, teacher_embeddings: Tensor, posterior: Tensor | None, schedule: dict[str, float]
    ) -> Tensor:
        """DINO's ``[2, B, K]`` targets: the GMM posterior, or centred and sharpened scores."""
        k = self.hparams.num_prototypes
        if posterior is not None and self.hparams.targets == "posterior":
            return self.posterior_targets(posterior).view(2, -1, k)
        if self.clustering is not None:
            # Partial (CAPI): Sinkhorn-Knopp over the whole (all-reduced) batch, no centring.
            with torch.no_grad():
                scores = self.clustering(teacher_embeddings.float())
                logits = scores / self.hparams.clustering_target_temperature
                return sinkhorn_knopp(logits).view(2, -1, k)
        # Centre and sharpen the scores with the previous centre, then move it. Prototypes
        # the mixture just moved (split and merge) start from the mean centre, not a stale one.
        if self.gmm is not None:
            self.objective.reset_center(self.gmm.moved)
        with torch.no_grad():
            teacher_scores = self.teacher_prototypes(teacher_embeddings).view(2, -1, k)
        targets = self.objective.teacher_distribution(
            teacher_scores, schedule["teacher_temperature"]
        )
        self.objective.update_center(teacher_scores)
        return targets

    @torch.no_grad()
    def ibot_patch_targets(
        self, teacher_patches: Tensor, masks: Tensor, schedule: dict[str, float]
    ) -> Tensor:
        """iBOT's patch targets ``[M, K_p]`` at the masked positions (``masks`` ``[N, h, w]``).

        Centred with the patch centre and sharpened with the patch temperature (the centre
        moves with all positions), or the patch mixture's posterior (``targets="posterior"``).
        """
        masked = masks.flatten(1)
        if self.gmm is not None and self.hparams.targets == "posterior":
            mixture = self.patch_gmm if self.patch_gmm is not None else self.gmm
            return self.posterior_targets(mixture.responsibilities(teacher_patches[masked]))
        num_images, num_patches, _ = teacher_patches.shape
        scores = self.teacher_patch_prototypes(teacher_patches.flatten(0, 1))
        scores = scores.view(num_images, num_patches, -1)
        targets = self.patch_objective.teacher_distribution(
            scores[masked], schedule["teacher_patch_temperature"]
        )
        self.patch_objective.update_center(scores)
        return targets

    def step_seed(self, purpose: str) -> int:
        """A seed for this step's own draws: a hash of (purpose, host_seed, rank, step).

        Independent of the global RNGs, identical on resume, different on each DDP rank.
        """
        key = f"{purpose}/{self.hparams.host_seed}/{self.global_rank}/{self.global_step}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1

    def ibot_masks(self, num_images: int) -> Tensor:
        """This step's iBOT block masks ``[num_images, h, w]`` (bool, True = masked)."""
        return self.masking(num_images, random.Random(self.step_seed("ibot-mask")))

    @torch.no_grad()
    def sample_patches(self, patches: Tensor) -> Tensor:
        """At most ``ibot_patch_gmm_samples`` rows of ``patches`` ``[N, P, d]``, seeded."""
        flat = patches.flatten(0, 1)
        limit = self.hparams.ibot_patch_gmm_samples
        if flat.shape[0] <= limit:
            return flat
        generator = torch.Generator().manual_seed(self.step_seed("ibot-patch-subset"))
        index = torch.randperm(flat.shape[0], generator=generator)[:limit]
        return flat[index.to(flat.device)]

    @torch.no_grad()
    def posterior_targets(self, posterior: Tensor) -> Tensor:
        """Teacher targets from the GMM posterior: tempered, optionally Sinkhorn-balanced."""
        logits = posterior.clamp_min(1e-30).log() / self.hparams.posterior_temperature
        if self.hparams.target_balancing == "sinkhorn":
            return sinkhorn_knopp(logits)
        return torch.softmax(logits, dim=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with DINO's two groups: weights decayed, biases and norms not.

        With ``prototype_lr_multiplier != 1``, a third group: the jointly learned prototypes
        (decayed, as in the first group), whose learning rate the multiplier scales. At 1 the
        layout stays DINO's two groups, so checkpoints of either layout keep loading into the
        runs that made them. :attr:`group_schedule` records each group's role, by position.
        """
        multiplier = self.hparams.prototype_lr_multiplier
        learned = [
            p for prototypes in self.learned_prototype_sets() for p in prototypes.parameters()
        ]
        separate = {id(param) for param in learned} if multiplier != 1.0 else set()
        decayed, not_decayed, prototypes = [], [], []
        for name, param in self.student.named_parameters():
            if id(param) in separate:
                prototypes.append(param)
            elif param.ndim <= 1 or name.endswith(".bias"):
                not_decayed.append(param)
            else:
                decayed.append(param)
        # Partial: the clustering layer is trained by its own loss only (CAPI uses a separate
        # AdamW; one optimizer is the same update, since no other loss reaches it), no decay.
        if self.clustering is not None:
            not_decayed += list(self.clustering.parameters())
        groups: list[dict[str, Any]] = [
            {"params": decayed},
            {"params": not_decayed, "weight_decay": 0.0},
        ]
        self.group_schedule = [(1.0, True), (1.0, False)]
        if prototypes:
            groups.append({"params": prototypes, "lr": self.hparams.lr * multiplier})
            self.group_schedule.append((multiplier, True))
        return torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Every step, from the step alone: a resumed optimizer (whose saved groups carry the
        # last step's values) is overwritten before it steps again.
        schedule = self._current_schedule()
        groups = self.trainer.optimizers[0].param_groups
        for group, (lr_factor, decayed) in zip(groups, self.group_schedule, strict=True):
            group["lr"] = schedule["lr"] * lr_factor
            if decayed:
                group["weight_decay"] = schedule["weight_decay"]

    def on_after_backward(self) -> None:
        # DINO's freeze_last_layer: the joint prototypes do not move during the first epoch(s).
        if self.gmm is None and self._current_schedule()["freeze_prototypes"]:
            for prototypes in self.learned_prototype_sets():
                for param in prototypes.parameters():
                    param.grad = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.step_guard is not None and self.step_guard.skip_step:
            return  # a skipped step moves nothing, the teacher included
        # 6. The teacher follows the student (its step's momentum, DINO's cosine schedule),
        #    right after the optimizer step: callbacks' on_train_batch_end (e.g. a mid-epoch
        #    checkpoint) run before the module's, and must see the step complete. The step
        #    counter moves after this hook, so global_step is still this step's.
        momentum = self.schedule_at(
            self.global_step, self.schedule_horizon(), self.steps_per_epoch()
        )["teacher_momentum"]
        update_ema_(self.teacher, self.student, momentum)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Augmentations draw from the global RNGs: save them so a resumed run continues the
        # same random stream (plain tensors and ints: loadable with weights_only=True).
        checkpoint["protogmm_rng"] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("protogmm_rng")
        if state is not None:
            restore_rng_state(state)

    # ------------------------------------------------------------------ logging
    @torch.no_grad()
    def _log_step(
        self,
        loss: Tensor,
        schedule: dict[str, float],
        targets: Tensor,
        extra: dict[str, Tensor | float] | None = None,
    ) -> None:
        """Loss, schedules, the two failure modes of design.md §3, the host's own terms."""
        probs = targets.reshape(-1, targets.shape[-1]).float()
        sample_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
        marginal = probs.mean(0)
        marginal_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
        metrics = {
            "train/loss": loss.detach(),
            "train/lr": schedule["lr"],
            "train/weight_decay": schedule["weight_decay"],
            "train/teacher_momentum": schedule["teacher_momentum"],
            "train/teacher_temperature": schedule["teacher_temperature"],
            # ~log K: targets near uniform; ~0: one-hot; the marginal's exp = prototypes in use
            "targets/sample_entropy": sample_entropy,
            "targets/marginal_entropy": marginal_entropy,
            "targets/argmax_used": float(probs.argmax(1).unique().numel()),
            **(extra or {}),
        }
        if self.gmm is not None:
            log_var = self.gmm.variances.log()
            per_component = log_var.mean(1) if log_var.ndim == 2 else log_var
            metrics.update(
                {
                    "gmm/beta": self.gmm.beta,
                    "gmm/log_var_mean": per_component.mean(),
                    "gmm/log_var_spread": per_component.std() if per_component.numel() > 1 else 0.0,
                    "gmm/reseeded": float(self.gmm.num_reseeded),
                    "gmm/merged": float(self.gmm.num_merged),
                }
            )
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", loss.detach(), on_step=True, prog_bar=True, logger=False)
