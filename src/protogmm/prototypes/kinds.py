"""How the prototypes are learned: jointly, decoupled, or partially decoupled, with each
kind's own options (``--model.prototypes Joint|Decoupled|Partial --model.prototypes.*``).

The kind is the paper's independent variable (Fig. 2): the same host (DINO, iBOT, CARP) is
trained against prototypes learned by the encoder's own loss (:class:`Joint`, the baseline
that collapses), against the means of an online Gaussian mixture fitted to the teacher's
embeddings (:class:`Decoupled`, paper eq. 2), or, in between, against a teacher layer
trained by its own clustering loss (:class:`Partial`, CAPI). Each class holds only the
options that apply to it, so an option of another kind is a parse error, not a silent no-op.

A kind is plain configuration: :class:`~protogmm.prototypes.sets.PrototypeSets` builds the
prototype modules from it, and a checkpoint stores :meth:`PrototypeKind.spec` (the class and
the options that differ from the defaults, plain values).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from protogmm._checks import check_choice, check_in_range
from protogmm.prototypes.mixture_options import MixtureOptions
from protogmm.specs import ConfigSpec

__all__ = ["Decoupled", "Joint", "Partial", "PrototypeKind", "POSTERIOR_WITHOUT_BALANCING"]

#: Why ``targets="posterior"`` wants ``target_balancing="sinkhorn"`` (measured, BENCHMARKS.md
#: "What we tried" and "Decoupling at small scale").
POSTERIOR_WITHOUT_BALANCING = (
    "model.prototypes.targets='posterior' with target_balancing='none': the GMM posterior is "
    "nearly one-hot (0.12 nats per sample on MNIST-5k vs 4.1 with Sinkhorn) and an early "
    "probe saw the encoder collapse onto 17 of 1024 components; "
    "set model.prototypes.target_balancing='sinkhorn' unless you are studying this"
)


class PrototypeKind(ConfigSpec):
    """How the prototypes are learned (base class; ``name`` is what logs and reports say)."""

    name: str = ""
    #: The prototypes are the means of an online mixture (buffers, no gradient).
    decoupled: bool = False


class Joint(PrototypeKind):
    """Prototypes learned by gradient with the encoder (DINO's weight-normalised last layer,
    with an EMA copy in the teacher): the baseline that collapses (paper §3).

    Args:
        init_scale: factor on the initial ``v`` of every learned set (> 0). The scores depend
            on the directions only and are unchanged, but an AdamW step turns a prototype by
            about ``lr * sqrt(d) / ||v||``; DINO's weight decay shrinks ``||v||`` to about
            0.05-0.25 within its first epochs, while nn.Linear's init gives about 0.5 here.
            1: nn.Linear's init (DINO's).
        lr_multiplier: the learned sets get their own AdamW group whose learning rate is the
            scheduled one times this factor (> 0; torch's AdamW decays by ``lr * wd``, so
            their decay step scales too). 1: one learning rate for all (DINO's).
        koleo_weight: weight of KoLeo-proto (Govindarajan et al. 2024) on every learned set,
            added to the host's loss (0: off).
        freeze_epochs: the learned sets get no update during the first epochs (DINO's
            ``freeze_last_layer``).
    """

    name = "joint"

    def __init__(
        self,
        init_scale: float = 1.0,
        lr_multiplier: float = 1.0,
        koleo_weight: float = 0.0,
        freeze_epochs: float = 1.0,
    ) -> None:
        for key, value in (("init_scale", init_scale), ("lr_multiplier", lr_multiplier)):
            check_in_range(f"model.prototypes.{key}", value, 0.0, math.inf, low_inclusive=False)
        check_in_range("model.prototypes.koleo_weight", koleo_weight, 0.0, math.inf)
        check_in_range("model.prototypes.freeze_epochs", freeze_epochs, 0.0, math.inf)
        self.init_scale = init_scale
        self.lr_multiplier = lr_multiplier
        self.koleo_weight = koleo_weight
        self.freeze_epochs = freeze_epochs


class Partial(Joint):
    """CAPI-style partial decoupling (Darcet et al. 2025; DINO host only): the teacher's
    prototypes are a separate layer trained by its own clustering loss on the detached
    teacher embeddings, never by the encoder's loss, and the targets are their
    Sinkhorn-Knopp-balanced scores; the student's prototypes stay joint. The baseline between
    joint and decoupled (paper Fig. 3a: CAPI 99.9 % unique at ε = 0.025).

    Args:
        target_temperature: temperature of the teacher scores before Sinkhorn-Knopp (CAPI
            0.06); the balanced result is both networks' target.
        temperature: temperature of the clustering layer's own prediction in its loss (CAPI
            0.12).
        **joint_options: :class:`Joint`'s options, for the student's set (not the
            clustering layer).
    """

    name = "partial"

    def __init__(
        self, target_temperature: float = 0.06, temperature: float = 0.12, **joint_options: Any
    ) -> None:
        super().__init__(**joint_options)
        for key, value in (
            ("target_temperature", target_temperature),
            ("temperature", temperature),
        ):
            check_in_range(f"model.prototypes.{key}", value, 0.0, math.inf, low_inclusive=False)
        self.target_temperature = target_temperature
        self.temperature = temperature


class Decoupled(PrototypeKind):
    """The prototypes are the means of an online Gaussian mixture fitted by EM to the EMA
    teacher's embeddings (paper eq. 2), shared by teacher and student, never given a
    gradient (paper Fig. 2b).

    Args:
        gmm: the mixture's options (:class:`~protogmm.prototypes.MixtureOptions`, or a
            mapping of those that differ from the defaults); ``anneal_steps`` is set from
            ``anneal_fraction`` unless given.
        anneal_fraction: fraction of the schedule's steps over which beta anneals to 1.
        targets: the teacher's targets: ``"host"`` (the host's own, e.g. DINO's centred and
            sharpened scores) or ``"posterior"`` (the mixture's posterior, no centring).
        posterior_temperature: ``targets="posterior"`` only: the targets are
            ``softmax(log gamma / T)`` (T > 1 softens the nearly one-hot posterior).
        target_balancing: ``targets="posterior"`` only: ``"sinkhorn"`` balances the targets
            over the prototypes with Sinkhorn-Knopp (equipartition, as SwAV/DINOv2), the
            guard against every sample choosing the same few components.
    """

    name = "decoupled"
    decoupled = True

    def __init__(
        self,
        gmm: MixtureOptions = MixtureOptions(),  # noqa: B008 (frozen: never mutated)
        anneal_fraction: float = 0.1,
        targets: Literal["host", "posterior"] = "host",
        posterior_temperature: float = 1.0,
        target_balancing: Literal["none", "sinkhorn"] = "none",
    ) -> None:
        self.gmm = _coerce_mixture(gmm)
        check_in_range("model.prototypes.anneal_fraction", anneal_fraction, 0.0, 1.0)
        check_choice("model.prototypes.targets", targets, ("host", "posterior"))
        check_in_range(
            "model.prototypes.posterior_temperature",
            posterior_temperature,
            0.0,
            math.inf,
            low_inclusive=False,
        )
        check_choice("model.prototypes.target_balancing", target_balancing, ("none", "sinkhorn"))
        if targets == "posterior" and target_balancing == "none":
            warnings.warn(POSTERIOR_WITHOUT_BALANCING, UserWarning, stacklevel=2)
        self.anneal_fraction = anneal_fraction
        self.targets = targets
        self.posterior_temperature = posterior_temperature
        self.target_balancing = target_balancing

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        # The mixture's top_k always: its default changed (None -> 8), so a checkpoint
        # without it was written with the dense update.
        spec["init_args"]["gmm"] = self.spec_value("gmm", self.gmm)
        return spec

    def spec_value(self, key: str, value: Any) -> Any:
        # The mixture's options as checkpoints have always held them: the overrides, plain
        # values, so weights-only loading reads them (and top_k, see spec).
        if key == "gmm":
            return {**value.overrides(), "top_k": value.top_k}
        return value


def _coerce_mixture(value: MixtureOptions | Mapping[str, Any] | None) -> MixtureOptions:
    try:
        return MixtureOptions.coerce(value)
    except ValueError as error:  # one line naming the option under its command-line key
        message = str(error)
        if message.startswith("model.gmm"):
            raise ValueError(message.replace("model.gmm", "model.prototypes.gmm", 1)) from None
        raise ValueError(f"model.prototypes.gmm.{message}") from None
