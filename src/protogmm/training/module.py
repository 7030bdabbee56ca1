"""One LightningModule for prototypical self-supervised learning (DINO host).

A reader can follow one training step top to bottom in :meth:`PrototypicalSSL.training_step`:

1. the EMA teacher embeds the global views (no gradient);
2. decoupled prototypes only: the online GMM is fitted to those embeddings (paper eq. 2),
   before the student sees them, and never receives a gradient;
3. the teacher's targets: DINO's centred, sharpened softmax over the prototype scores
   (``targets="host"``) or the GMM's annealed posterior (``targets="posterior"``), computed
   once by the GMM's update;
4. the student embeds every view and is scored against the same (fixed) prototypes;
5. the DINO cross-entropy over all (teacher view, other student view) pairs (paper eq. 3);
6. after the optimizer step, the teacher follows the student by EMA.

Joint prototypes (``prototypes="joint"``) are DINO's weight-normalised last layer, learned by
gradient with the encoder, with an EMA copy in the teacher (the baseline that collapses).
"""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.models import ProjectionHead, build_backbone, make_teacher, update_ema_
from protogmm.objectives import DINOLoss
from protogmm.objectives.balancing import sinkhorn_knopp
from protogmm.prototypes import LearnedPrototypes, OnlineGMM, PrototypeSet
from protogmm.schedules import cosine_ramp, linear_ramp, warmup_cosine

PrototypeKind = Literal["joint", "decoupled"]
Targets = Literal["host", "posterior"]
Balancing = Literal["none", "sinkhorn"]


class PrototypicalSSL(L.LightningModule):
    """DINO with joint or decoupled (online-GMM) prototypes.

    Schedules are per step and derived from the step alone (so resuming restores them
    exactly): cosine learning rate with linear warm-up, cosine weight decay, cosine teacher
    momentum, linear teacher-temperature warm-up, and the GMM's annealing of beta.

    Args:
        backbone: a name known to :func:`protogmm.models.build_backbone`.
        backbone_kwargs: extra keyword arguments of the backbone.
        in_channels: image channels (linked from the data module by the CLI).
        image_size: global-crop size in pixels (linked from the data module by the CLI).
        prototypes: ``"joint"`` (learned by gradient, DINO) or ``"decoupled"`` (online GMM).
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
        gmm: keyword arguments of :class:`protogmm.prototypes.OnlineGMM` (``anneal_steps``
            is set from ``gmm_anneal_fraction`` unless given).
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
        freeze_prototypes_epochs: joint only: the prototype layer gets no update during the
            first epochs (DINO's ``freeze_last_layer``).
    """

    def __init__(
        self,
        backbone: str = "convnet",
        backbone_kwargs: dict[str, Any] | None = None,
        in_channels: int = 1,
        image_size: int = 28,
        prototypes: PrototypeKind = "decoupled",
        num_prototypes: int = 1024,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        head_layers: int = 3,
        head_bn: bool = True,
        targets: Targets = "host",
        gmm: dict[str, Any] | None = None,
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
        freeze_prototypes_epochs: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice("model.prototypes", prototypes, ("joint", "decoupled"))
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
        ):
            check_in_range(name, value, 0.0, math.inf, low_inclusive=False)
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
        head = ProjectionHead(
            encoder.feature_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=head_layers,
            use_bn=head_bn,
        )
        self.student = nn.ModuleDict({"backbone": encoder, "head": head})
        if prototypes == "joint":
            # DINO: the prototypes are the student's last layer; the teacher holds an EMA copy.
            self.student["prototypes"] = LearnedPrototypes(num_prototypes, bottleneck_dim)
            self.gmm = None
        else:
            # Decoupled (paper Fig. 2b): one mixture shared by teacher and student, buffers only.
            gmm_kwargs = dict(gmm or {})
            self._anneal_from_fraction = "anneal_steps" not in gmm_kwargs
            try:
                self.gmm = OnlineGMM(num_prototypes, bottleneck_dim, **gmm_kwargs)
            except (TypeError, ValueError) as error:
                raise ValueError(f"model.gmm: {error}") from None
        self.teacher = make_teacher(self.student)
        self.objective = DINOLoss(
            num_prototypes,
            student_temperature=student_temperature,
            center_momentum=center_momentum,
        )

    # ------------------------------------------------------------------ prototype sets
    @property
    def student_prototypes(self) -> PrototypeSet:
        return self.gmm if self.gmm is not None else self.student["prototypes"]

    @property
    def teacher_prototypes(self) -> PrototypeSet:
        return self.gmm if self.gmm is not None else self.teacher["prototypes"]

    def prototypes_fitted(self) -> bool:
        """False while a decoupled mixture still waits for its first embeddings."""
        return self.gmm is None or bool(self.gmm.initialized)

    def prototype_vectors(self) -> Tensor:
        """The ``[K, d]`` unit prototypes the diagnostics measure (the teacher's for joint)."""
        return self.teacher_prototypes.prototypes().detach()

    # ------------------------------------------------------------------ schedules
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, from the trainer's estimate of the whole run."""
        return max(
            1, int(self.trainer.estimated_stepping_batches) // max(1, self.trainer.max_epochs)
        )

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
            "freeze_prototypes": float(step < hp.freeze_prototypes_epochs * steps_per_epoch),
        }

    def _current_schedule(self) -> dict[str, float]:
        return self.schedule_at(
            self.global_step, int(self.trainer.estimated_stepping_batches), self.steps_per_epoch()
        )

    def on_fit_start(self) -> None:
        if self.gmm is not None and self._anneal_from_fraction:
            total = int(self.trainer.estimated_stepping_batches)
            self.gmm.anneal_steps = int(round(self.hparams.gmm_anneal_fraction * total))

    # ------------------------------------------------------------------ forward passes
    def embed(self, net: nn.ModuleDict, views: list[Tensor]) -> Tensor:
        """L2-normalised bottleneck embeddings ``[V * B, d]`` of views, grouped by resolution.

        Views of one size go through the backbone together (DINO's ``MultiCropWrapper``).
        """
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            features.append(net["backbone"](torch.cat(views[start:end])))
            start = end
        return net["head"](torch.cat(features))

    def forward(self, images: Tensor) -> Tensor:
        """Backbone features of the teacher (the encoder evaluated by k-NN, as in DINO)."""
        return self.teacher["backbone"](images)

    # ------------------------------------------------------------------ one training step
    def training_step(self, batch: tuple[list[Tensor], Tensor], batch_idx: int) -> Tensor:
        views, _ = batch
        n_global, batch_size = 2, views[0].shape[0]
        schedule = self._current_schedule()

        # 1. The teacher embeds the global views.
        with torch.no_grad():
            teacher_embeddings = self.embed(self.teacher, views[:n_global])  # [2B, d]

        # 2. Decoupled: fit the mixture to the teacher's embeddings first (paper eq. 2).
        posterior = None
        if self.gmm is not None:
            posterior = self.gmm.update(teacher_embeddings.float())

        # 3. The teacher's targets over the (now fixed) prototypes.
        k = self.hparams.num_prototypes
        if posterior is not None and self.hparams.targets == "posterior":
            targets = self.posterior_targets(posterior).view(n_global, batch_size, k)
        else:
            # DINO: centre and sharpen the scores with the previous centre, then move it.
            with torch.no_grad():
                teacher_scores = self.teacher_prototypes(teacher_embeddings)
            teacher_scores = teacher_scores.view(n_global, batch_size, k)
            targets = self.objective.teacher_distribution(
                teacher_scores, schedule["teacher_temperature"]
            )
            self.objective.update_center(teacher_scores)

        # 4. The student embeds every view and is scored against the same prototypes.
        student_scores = self.student_prototypes(self.embed(self.student, views))
        student_scores = student_scores.view(len(views), batch_size, k)

        # 5. DINO's cross-entropy over all (teacher view, other student view) pairs (eq. 3).
        loss = self.objective(student_scores, teacher_probs=targets)

        self._log_step(loss, schedule, targets)
        return loss

    @torch.no_grad()
    def posterior_targets(self, posterior: Tensor) -> Tensor:
        """Teacher targets from the GMM posterior: tempered, optionally Sinkhorn-balanced."""
        logits = posterior.clamp_min(1e-30).log() / self.hparams.posterior_temperature
        if self.hparams.target_balancing == "sinkhorn":
            return sinkhorn_knopp(logits)
        return torch.softmax(logits, dim=1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with DINO's two groups: weights decayed, biases and norms not."""
        decayed, not_decayed = [], []
        for name, param in self.student.named_parameters():
            (not_decayed if param.ndim <= 1 or name.endswith(".bias") else decayed).append(param)
        return torch.optim.AdamW(
            [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        schedule = self._current_schedule()
        for index, group in enumerate(self.trainer.optimizers[0].param_groups):
            group["lr"] = schedule["lr"]
            if index == 0:
                group["weight_decay"] = schedule["weight_decay"]

    def on_after_backward(self) -> None:
        # DINO's freeze_last_layer: the joint prototypes do not move during the first epoch(s).
        if self.gmm is None and self._current_schedule()["freeze_prototypes"]:
            for param in self.student["prototypes"].parameters():
                param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # 6. The teacher follows the student (its step's momentum, DINO's cosine schedule).
        momentum = self.schedule_at(
            self.global_step - 1,
            int(self.trainer.estimated_stepping_batches),
            self.steps_per_epoch(),
        )["teacher_momentum"]
        update_ema_(self.teacher, self.student, momentum)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Augmentations draw from the global RNGs: save them so a resumed run continues the
        # same random stream (plain tensors and ints: loadable with weights_only=True).
        np_state = np.random.get_state()
        checkpoint["protogmm_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [
                np_state[0],
                torch.from_numpy(np_state[1].astype(np.int64)),
                int(np_state[2]),
                int(np_state[3]),
                float(np_state[4]),
            ],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("protogmm_rng")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))

    # ------------------------------------------------------------------ logging
    @torch.no_grad()
    def _log_step(self, loss: Tensor, schedule: dict[str, float], targets: Tensor) -> None:
        """Loss, schedules, and the two failure modes of design.md §3 (per step)."""
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
                }
            )
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", loss.detach(), on_step=True, prog_bar=True, logger=False)
