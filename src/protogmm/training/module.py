"""One LightningModule for prototypical self-supervised learning: any host, any prototypes.

:meth:`PrototypicalSSL.training_step` reads top to bottom: this step's schedule, the host's
step (:meth:`protogmm.hosts.Host.step`: the EMA teacher embeds the views, the prototypes are
fitted to them (paper eq. 2), the encoder is trained against them (paper eq. 3)), KoLeo-proto
for jointly learned prototypes if asked, and the logs. After the optimizer step the teacher
follows the student by EMA (:meth:`PrototypicalSSL.optimizer_step`).

What the module owns: the student and teacher networks, the prototype modules under their
checkpoint names (built and resolved once by :mod:`protogmm.prototypes.sets`), the schedules,
the optimizer, exact resume and logging. What the method does is the host's
(:mod:`protogmm.hosts`); how the prototypes are learned is the kind's
(:mod:`protogmm.prototypes.kinds`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.evaluation.features import extract_features, extract_features_sharded
from protogmm.hosts import DINO, Host, StepContext
from protogmm.models import ProjectionHead, build_backbone, make_teacher, update_ema_
from protogmm.prototypes import OnlineGMM, PrototypeSet
from protogmm.prototypes.kinds import Decoupled, Joint, Partial, PrototypeKind
from protogmm.prototypes.koleo import koleo_proto_loss
from protogmm.prototypes.sets import PrototypeSets, add_prototype_modules
from protogmm.schedules import cosine_ramp, warmup_cosine
from protogmm.training.distributed import capture_rng_state, restore_rng_state
from protogmm.training.legacy_hparams import upgrade_model_hparams
from protogmm.training.optimization import (
    build_optimizer,
    clip_each_parameter_,
    parameter_groups,
)
from protogmm.training.step_metrics import step_metrics

#: State-dict prefixes of the host's objectives before they moved into ``host`` (old
#: checkpoints are renamed as they load).
_MOVED_STATE_PREFIXES = ("objective.", "patch_objective.")


class PrototypicalSSL(L.LightningModule):
    """DINO, iBOT or CARP with joint, decoupled (online-GMM) or partial prototypes.

    Schedules are per step and derived from the step alone (so resuming restores them
    exactly): cosine learning rate with linear warm-up, cosine weight decay, cosine teacher
    momentum, the host's own (e.g. the teacher-temperature warm-up), and the GMM's annealing
    of beta. They span :meth:`schedule_horizon` optimizer steps (the run's, or
    ``schedule_steps``); the options given in epochs count epochs of the real training loader
    (:meth:`steps_per_epoch`).

    Args:
        backbone: a name known to :func:`protogmm.models.build_backbone`.
        backbone_kwargs: extra keyword arguments of the backbone.
        in_channels: image channels (linked from the data module by the CLI).
        image_size: global-crop size in pixels (linked from the data module by the CLI).
        host: the method (:class:`~protogmm.hosts.DINO`, :class:`~protogmm.hosts.IBOT`,
            :class:`~protogmm.hosts.CARP`) with its options; None: ``DINO()``. Also accepted:
            its short name (``"ibot"``) or its spec as checkpoints store it.
        prototypes: how the prototypes are learned (:class:`~protogmm.prototypes.Joint`,
            :class:`~protogmm.prototypes.Decoupled`, :class:`~protogmm.prototypes.Partial`)
            with its options; None: ``Decoupled()``. Also a short name or a spec.
        num_prototypes: K.
        hidden_dim: width of the projection MLP.
        bottleneck_dim: d, the dimension of the L2-normalised embedding scored against the
            prototypes.
        head_layers: layers of the projection MLP.
        head_bn: batch norm in the projection MLP (default on, as lightly's CIFAR DINO and
            CARP: measured on MNIST-5k at init, the ConvNet's embeddings without it sit in a
            small cap of the sphere, mean pairwise cosine 0.85, so any prototypes fitted to
            them are near-duplicates; with it 0.21).
        lr: peak learning rate (after warm-up).
        min_lr: final learning rate of the cosine decay.
        warmup_epochs: epochs of linear learning-rate warm-up.
        weight_decay: weight decay at step 0 (cosine to ``weight_decay_end``).
        weight_decay_end: final weight decay.
        teacher_momentum: EMA momentum at step 0 (cosine to 1).
        schedule_steps: the horizon of every schedule in optimizer steps (>= 1), instead of
            the run's own length (``trainer.estimated_stepping_batches``): the learning-rate
            cosine, the weight-decay and teacher-momentum cosines and the GMM's annealing are
            laid out for this many steps, and the run trains only as many as the trainer runs,
            so a run of M < N steps is the first M steps of an N-step run (DINO's collapse
            happens in its first 10 of 100 epochs). The options in epochs stay in epochs of
            the real training loader. None: the run's length (the default).
        optimizer: ``"adamw"`` (DINO's ViTs), ``"lars"`` (DINO's and CARP's ResNet-50:
            timm's LARS, momentum 0.9, trust coefficient 0.001, the layer-wise trust ratio on
            the decayed group only, so biases and norms are not adapted, as DINO's LARS
            filter) or ``"sgd"`` (momentum 0.9). Every one follows the same learning-rate and
            weight-decay schedules and keeps the same parameter groups.
        clip_grad: DINO's ``--clip_grad``: each parameter's gradient norm is capped at this
            value on its own (:func:`~protogmm.training.optimization.clip_each_parameter_`).
            None: no such clip. The trainer's ``gradient_clip_val`` is Lightning's clip of
            all gradients together by one factor, a different rule; both may be set.
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
        host: Host | None = None,
        prototypes: PrototypeKind | None = None,
        num_prototypes: int = 1024,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        head_layers: int = 3,
        head_bn: bool = True,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        warmup_epochs: float = 1.0,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        teacher_momentum: float = 0.996,
        schedule_steps: int | None = None,
        optimizer: Literal["adamw", "lars", "sgd"] = "adamw",
        clip_grad: float | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(locals())
        host = Host.build(DINO() if host is None else host, "model.host").fresh()
        kind = PrototypeKind.build(
            Decoupled() if prototypes is None else prototypes, "model.prototypes"
        )
        if isinstance(kind, Partial) and host.name != "dino":
            raise ValueError(
                "model.prototypes: Partial (CAPI-style) is built for model.host DINO only, "
                f"got {type(host).__name__}"
            )
        self.save_hyperparameters(ignore=["host", "prototypes"])
        # Plain values (weights-only loading reads them): each class and its changed options.
        self.hparams["host"], self.hparams["prototypes"] = host.spec(), kind.spec()
        self.hparams.pop("_instantiator", None)
        self._hparams_initial = copy.deepcopy(self._hparams)  # what hparams.yaml is written from

        try:
            encoder = build_backbone(
                backbone, in_channels=in_channels, image_size=image_size, **(backbone_kwargs or {})
            )
        except ValueError as error:
            raise ValueError(f"model.backbone: {error}") from None
        head = ProjectionHead(
            encoder.feature_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=head_layers,
            use_bn=head_bn,
        )
        self.student = nn.ModuleDict({"backbone": encoder, "head": head})
        host.setup(num_prototypes, kind, encoder)
        mask_token = getattr(encoder, "mask_token", None)
        if mask_token is not None and not host.masks_patches:
            # Unused without masking: left out of the gradient, which DDP requires of every
            # trainable parameter (a DINO ViT under DDP failed on it); still in checkpoints.
            mask_token.requires_grad_(False)
        self.host = host
        # Before the teacher is copied: a joint set's teacher copy starts as the student's.
        add_prototype_modules(
            self,
            self.student,
            kind,
            num_prototypes,
            bottleneck_dim,
            host.patch_set_size(num_prototypes),
        )
        self.teacher = make_teacher(self.student)
        self.prototype_sets = PrototypeSets.resolve(self, self.student, self.teacher, kind)
        self._register_load_state_dict_pre_hook(_rename_moved_state)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> PrototypicalSSL:
        """A module from its hyperparameters in either layout: today's, or the flat one of
        checkpoints and configs before the host classes (``host: ibot``, ``koleo_weight``,
        ...; :func:`~protogmm.training.legacy_hparams.upgrade_model_hparams`)."""
        return cls(**upgrade_model_hparams(hparams))

    # ------------------------------------------------------------------ prototype sets
    @property
    def kind(self) -> PrototypeKind:
        """How the prototypes are learned (``self.prototype_sets.kind``)."""
        return self.prototype_sets.kind

    @property
    def patch_gmm(self) -> OnlineGMM | None:
        """Decoupled iBOT with separate patch prototypes: the patch tokens' own mixture."""
        return self.prototype_sets.patch_mixture

    def prototypes_fitted(self) -> bool:
        """False while a decoupled mixture still waits for its first embeddings."""
        return self.prototype_sets.fitted()

    def prototype_vectors(self) -> Tensor:
        """The ``[K, d]`` unit prototypes the diagnostics measure (the teacher's for joint)."""
        return self.prototype_sets.teacher.prototypes().detach()

    def teacher_prototype_set(self) -> PrototypeSet:
        """The set the teacher scores against (its targets; diagnose's usage)."""
        return self.prototype_sets.teacher

    def teacher_embeddings(
        self, loader: DataLoader, *, sharded: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The teacher's embeddings (backbone, projection head) of ``loader``'s images and
        their labels, on this module's device, with BatchNorm on batch statistics as the
        teacher embeds in training (:mod:`protogmm.evaluation.features`).

        Args:
            loader: the images, e.g. a data module's k-NN loader.
            sharded: every process of the process group calls this and embeds its share
                (``protogmm diagnose`` under torchrun); False: this process embeds all (what
                rank 0 alone may call).
        """
        teacher = nn.Sequential(self.teacher["backbone"], self.teacher["head"])
        if sharded:
            return extract_features_sharded(teacher, loader, self.device, batch_statistics=True)
        return extract_features(teacher, loader, self.device, batch_statistics=True)

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
        freeze_epochs = self.kind.freeze_epochs if isinstance(self.kind, Joint) else 0.0
        return {
            "lr": warmup_cosine(step, total_steps, warmup_steps, hp.lr, hp.min_lr),
            "weight_decay": cosine_ramp(step, total_steps, hp.weight_decay, hp.weight_decay_end),
            "teacher_momentum": cosine_ramp(step, total_steps, hp.teacher_momentum, 1.0),
            **self.host.schedule_at(step, steps_per_epoch),
            "freeze_prototypes": float(step < freeze_epochs * steps_per_epoch),
        }

    def _current_schedule(self) -> dict[str, float]:
        return self.schedule_at(self.global_step, self.schedule_horizon(), self.steps_per_epoch())

    def on_fit_start(self) -> None:
        kind = self.kind
        if isinstance(kind, Decoupled) and kind.gmm.anneal_steps is None:
            # beta counts the mixture's updates: one per micro-batch (accumulation included).
            updates = self.schedule_horizon() * self.trainer.accumulate_grad_batches
            steps = int(round(kind.anneal_fraction * updates))
            for mixture in self.prototype_sets.mixtures:
                mixture.anneal_steps = steps

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

    # ------------------------------------------------------------------ one training step
    def forward(self, images: Tensor) -> Tensor:
        """Backbone features of the teacher (the encoder evaluated by k-NN, as in DINO)."""
        return self.teacher["backbone"](images)

    def step_context(self, schedule: dict[str, float], batch_idx: int = 0) -> StepContext:
        """What the host's step is handed: the networks, the prototype sets, the schedule."""
        accumulation = 1 if self._trainer is None else self.trainer.accumulate_grad_batches
        return StepContext(
            self.student,
            self.teacher,
            self.prototype_sets,
            schedule,
            step=self.global_step,
            rank=self.global_rank,
            micro_batch=batch_idx % accumulation,
        )

    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        views, _ = batch
        if self.step_guard is not None and self.step_guard.skip_step:
            # Skipped by the guard (non-finite input): a zero loss, no update (see the guard).
            return self.step_guard.skipped_step_loss(self)
        schedule = self._current_schedule()

        # The host's step: the teacher embeds, the prototypes are fitted (eq. 2), the
        # encoder is trained against them (eq. 3); see protogmm.hosts.base.Host.step.
        output = self.host.step(self.step_context(schedule, batch_idx), views)
        loss, metrics = output.loss, dict(output.metrics)

        # Joint only: KoLeo-proto pushes every learned prototype from its nearest neighbour.
        kind = self.kind
        if isinstance(kind, Joint) and kind.koleo_weight > 0:
            koleo = sum(koleo_proto_loss(p.weight) for p in self.prototype_sets.learned)
            loss = loss + kind.koleo_weight * koleo
            metrics["train/koleo"] = koleo.detach()

        self._log_step(loss, schedule, output.targets, metrics)
        return loss

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer (AdamW by default) over DINO's two groups: weights decayed, biases
        and norms not.

        With a joint ``lr_multiplier != 1``, a third group: the jointly learned prototypes
        (decayed, as in the first group), whose learning rate the multiplier scales. At 1 the
        layout stays DINO's two groups, so checkpoints of either layout keep loading into the
        runs that made them. :attr:`group_schedule` records each group's role, by position.
        """
        kind = self.kind
        multiplier = kind.lr_multiplier if isinstance(kind, Joint) else 1.0
        groups, self.group_schedule = parameter_groups(
            self.student, self.prototype_sets, multiplier, self.hparams.lr
        )
        hp = self.hparams
        return build_optimizer(hp.optimizer, groups, hp.lr, hp.weight_decay)

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
        if self.prototype_sets.learned and self._current_schedule()["freeze_prototypes"]:
            for prototypes in self.prototype_sets.learned:
                for param in prototypes.parameters():
                    param.grad = None

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.hparams.clip_grad is not None:  # DINO's --clip_grad: each parameter alone
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip_each_parameter_(params, self.hparams.clip_grad)
        # The trainer's gradient_clip_val, if any: Lightning's clip of all norms together.
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.step_guard is not None and self.step_guard.skip_step:
            return  # a skipped step moves nothing, the teacher included
        # The teacher follows the student (its step's momentum, DINO's cosine schedule),
        # right after the optimizer step: callbacks' on_train_batch_end (e.g. a mid-epoch
        # checkpoint) run before the module's, and must see the step complete. The step
        # counter moves after this hook, so global_step is still this step's.
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
    def _log_step(
        self, loss: Tensor, schedule: dict[str, float], targets: Tensor, extra: dict[str, Any]
    ) -> None:
        metrics = step_metrics(loss, schedule, targets, self.prototype_sets.mixture)
        self.log_dict({**metrics, **extra}, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", loss.detach(), on_step=True, prog_bar=True, logger=False)


def _check_arguments(args: Mapping[str, Any]) -> None:
    """One-line errors naming the key, before anything is built."""
    for key in ("num_prototypes", "bottleneck_dim", "hidden_dim", "head_layers"):
        check_positive_int(f"model.{key}", args[key])
    check_in_range("model.lr", args["lr"], 0.0, math.inf, low_inclusive=False)
    for key in ("min_lr", "weight_decay", "weight_decay_end", "warmup_epochs"):
        check_in_range(f"model.{key}", args[key], 0.0, math.inf)
    check_in_range("model.teacher_momentum", args["teacher_momentum"], 0.0, 1.0)
    if args["schedule_steps"] is not None:
        check_positive_int("model.schedule_steps", args["schedule_steps"])
    check_choice("model.optimizer", args["optimizer"], ("adamw", "lars", "sgd"))
    if args["clip_grad"] is not None:
        check_in_range("model.clip_grad", args["clip_grad"], 0.0, math.inf, low_inclusive=False)


def _rename_moved_state(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Old checkpoints: the host's objectives were the module's own (``objective.center``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if name.startswith(_MOVED_STATE_PREFIXES):
            state_dict[f"{prefix}host.{name}"] = state_dict.pop(key)
