"""The LightningModule end to end on tiny synthetic data (CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import (
    HALF_EPOCH_WARMUP,
    STEP_BY_STEP,
    TINY_MODEL,
    TINY_VIT,
    fit_tiny,
    logged,
    one_step,
    tiny_data,
    training_batch,
)
from protogmm.hosts import Host
from protogmm.hosts.base import embed
from protogmm.objectives import DINOLoss
from protogmm.objectives.balancing import sinkhorn_knopp
from protogmm.training.module import PrototypicalSSL

#: The tiny model, a half-epoch warm-up, and the teacher temperature's over one epoch.
MODEL = TINY_MODEL | HALF_EPOCH_WARMUP | {"teacher_temperature_warmup_epochs": 1.0}


def tiny_model(kind: str, **kwargs: object) -> PrototypicalSSL:
    return PrototypicalSSL.from_hparams({"prototypes": kind, **(MODEL | kwargs)})


def fit(
    tmp_path: Path,
    kind: str,
    epochs: int = 2,
    ckpt_path: str | None = None,
    crash_at_step: int | None = None,
    callbacks: tuple[L.Callback, ...] = (),
    max_steps: int = -1,
    **model_kwargs: object,
) -> tuple[PrototypicalSSL, L.Trainer]:
    return fit_tiny(
        tmp_path,
        MODEL | {"prototypes": kind} | model_kwargs,
        ckpt_path=ckpt_path,
        crash_at_step=crash_at_step,
        callbacks=callbacks,
        max_epochs=epochs,
        max_steps=max_steps,
        **STEP_BY_STEP,
    )


@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_trains_and_writes_the_run_directory(tmp_path: Path, kind: str) -> None:
    model, trainer = fit(tmp_path, kind)
    assert trainer.global_step == 8  # 64 samples / batch 16 x 2 epochs
    recorded = logged(tmp_path, "train/loss")
    assert len(recorded) == 8 and all(math.isfinite(loss) for _, loss in recorded)
    for name in (
        "metrics.csv",
        "summary.json",
        "report.md",
        "collapse_over_training.png",
        "checkpoints/last.ckpt",
    ):
        assert (tmp_path / name).exists(), name
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    for column in (
        "knn/top1",
        "knn/untrained",
        "knn/pixels",
        "unique_pct/eps=0.025",
        "targets/sample_entropy",
    ):
        assert column in header, column
    assert "best-knn" in " ".join(p.name for p in (tmp_path / "checkpoints").iterdir())


def optimised_parameters(model: PrototypicalSSL) -> set[int]:
    optimizer = model.configure_optimizers()
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_decoupled_gmm_changes_gets_no_gradient_and_is_not_optimised() -> None:
    L.seed_everything(0, verbose=False)
    # init_samples=0: initialised on the first batch (by default it waits for K rows).
    model = tiny_model("decoupled", gmm={"init_samples": 0})
    before = {k: v.clone() for k, v in model.gmm.state_dict().items()}
    one_step(model)
    assert not torch.equal(model.gmm.mean, before["mean"])
    assert model.gmm.step == 1
    assert list(model.gmm.parameters()) == []
    assert all(not b.requires_grad and b.grad is None for b in model.gmm.buffers())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student["backbone"].parameters())
    assert not any(id(p) in optimised_parameters(model) for p in model.teacher.parameters())


def test_joint_prototypes_get_gradients_and_teacher_none() -> None:
    L.seed_everything(0, verbose=False)
    model = tiny_model("joint")
    one_step(model)
    assert model.student["prototypes"].weight.grad is not None
    assert model.student["prototypes"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert id(model.student["prototypes"].weight) in optimised_parameters(model)


def test_schedules_hit_their_endpoints() -> None:
    model = tiny_model(
        "joint",
        lr=0.01,
        min_lr=1e-4,
        warmup_epochs=2.0,
        weight_decay=0.04,
        weight_decay_end=0.4,
        teacher_momentum=0.99,
        warmup_teacher_temperature=0.04,
        teacher_temperature=0.07,
        teacher_temperature_warmup_epochs=3.0,
        freeze_prototypes_epochs=1.0,
    )
    total, per_epoch = 100, 10
    start = model.schedule_at(0, total, per_epoch)
    peak = model.schedule_at(20, total, per_epoch)
    end = model.schedule_at(total, total, per_epoch)
    assert start["lr"] == 0.0 and peak["lr"] == pytest.approx(0.01)
    assert end["lr"] == pytest.approx(1e-4)
    assert model.schedule_at(10, total, per_epoch)["lr"] == pytest.approx(0.005)
    assert start["weight_decay"] == pytest.approx(0.04)
    assert end["weight_decay"] == pytest.approx(0.4)
    assert start["teacher_momentum"] == pytest.approx(0.99)
    assert end["teacher_momentum"] == pytest.approx(1.0)
    assert start["teacher_temperature"] == pytest.approx(0.04)
    assert model.schedule_at(30, total, per_epoch)["teacher_temperature"] == pytest.approx(0.07)
    assert model.schedule_at(9, total, per_epoch)["freeze_prototypes"] == 1.0
    assert model.schedule_at(10, total, per_epoch)["freeze_prototypes"] == 0.0


def test_gmm_annealing_spans_its_fraction_of_training(tmp_path: Path) -> None:
    model, trainer = fit(tmp_path, "decoupled", epochs=2, gmm_anneal_fraction=0.5)
    assert model.gmm.anneal_steps == 4
    assert model.gmm.beta == 1.0


@pytest.mark.parametrize("kind", ["joint", "decoupled", "partial"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, kind: str) -> None:
    full_model, _ = fit(tmp_path / "full", kind, epochs=3)
    # The same run crashes mid-way through its second epoch; last.ckpt is from epoch 1's end.
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "first", kind, epochs=3, crash_at_step=6)
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    resumed_model, _ = fit(tmp_path / "resumed", kind, epochs=3, ckpt_path=str(checkpoint))
    full_losses = dict(logged(tmp_path / "full", "train/loss"))
    resumed_losses = dict(logged(tmp_path / "resumed", "train/loss"))
    assert sorted(resumed_losses) == [s for s in sorted(full_losses) if s >= 4]
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], abs=1e-6), step
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"lr": -1.0}, "model.lr"),
        ({"num_prototypes": 0}, "model.num_prototypes"),
        ({"backbone": "alexnet"}, "model.backbone"),
        ({"prototypes": "both"}, "model.prototypes"),
        ({"gmm": {"eta": 2.0}}, "model.prototypes.gmm"),
        ({"gmm": {"etaa": 0.5}}, "model.prototypes.gmm"),
    ],
)
def test_bad_model_config_names_the_key(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        tiny_model(kwargs.pop("prototypes", "decoupled"), **kwargs)


def test_crops_larger_than_the_image_are_rejected() -> None:
    with pytest.raises(ValueError, match="local_size"):
        tiny_data(local_size=40)


def test_posterior_targets_are_tempered_and_optionally_balanced() -> None:
    posterior = torch.softmax(
        torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 4, dim=1
    )
    posterior[:, 0] += 5.0
    posterior = posterior / posterior.sum(1, keepdim=True)  # every sample prefers component 0
    with pytest.warns(UserWarning, match="target_balancing"):
        plain = tiny_model("decoupled", targets="posterior")
    torch.testing.assert_close(Host.posterior_targets(plain.kind, posterior), posterior)
    with pytest.warns(UserWarning, match="target_balancing"):
        soft = tiny_model("decoupled", targets="posterior", posterior_temperature=2.0)
    expected = torch.softmax(posterior.log() / 2.0, dim=1)
    torch.testing.assert_close(Host.posterior_targets(soft.kind, posterior), expected)
    balanced = tiny_model("decoupled", targets="posterior", target_balancing="sinkhorn")
    targets = Host.posterior_targets(balanced.kind, posterior)
    torch.testing.assert_close(targets.sum(1), torch.ones(64), atol=1e-5, rtol=0)
    assert float(targets.sum(0).max()) < 0.5 * float(posterior.sum(0).max())


def test_posterior_targets_warn_without_balancing_only() -> None:
    """The measured failure (one-hot targets, early representation collapse) is flagged."""
    import warnings

    from protogmm.prototypes.kinds import POSTERIOR_WITHOUT_BALANCING

    with pytest.warns(UserWarning) as record:
        tiny_model("decoupled", targets="posterior", target_balancing="none")
    assert [str(w.message) for w in record] == [POSTERIOR_WITHOUT_BALANCING]
    assert "model.prototypes.targets" in POSTERIOR_WITHOUT_BALANCING
    assert "model.prototypes.target_balancing" in POSTERIOR_WITHOUT_BALANCING
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model("decoupled", targets="posterior", target_balancing="sinkhorn")
        tiny_model("decoupled", targets="host")
        tiny_model("joint")


# ---------------------------------------------------------------- partial (CAPI-style)


def teacher_embeddings_and_views(model: PrototypicalSSL) -> tuple[list[torch.Tensor], torch.Tensor]:
    views, _ = training_batch()
    with torch.no_grad():
        teacher = embed(model.teacher, views[:2])
    return views, teacher


def test_targets_and_loss_follow_the_capi_formulas() -> None:
    L.seed_everything(0, verbose=False)
    model = tiny_model("partial")
    views, h = teacher_embeddings_and_views(model)
    schedule = model.schedule_at(0, 10, 5)
    w = F.normalize(model.clustering.weight.detach(), dim=1)
    scores = F.normalize(h, dim=1) @ w.T  # [2B, K] cosines
    # Targets: Sinkhorn-Knopp of the clustering layer's scores / 0.06, no centring.
    expected_targets = sinkhorn_knopp(scores / 0.06).view(2, 8, -1)
    targets = model.host.cls_targets(model.step_context(schedule), h, None)
    torch.testing.assert_close(targets, expected_targets)
    center = model.host.objective.center
    assert torch.equal(center, torch.zeros_like(center))
    # Loss: DINO on the student's own (joint) prototypes + CE(targets, softmax(scores / 0.12)).
    torch.manual_seed(1)
    output = model.host.step(model.step_context(schedule), views)
    loss, metrics = output.loss, output.metrics
    with torch.no_grad():
        student_scores = model.student["prototypes"](embed(model.student, views))
    dino = DINOLoss(32)(student_scores.view(4, 8, -1), teacher_probs=expected_targets)
    clustering = -(expected_targets.reshape(16, -1) * F.log_softmax(scores / 0.12, 1)).sum(1)
    torch.testing.assert_close(metrics["train/clustering_loss"], clustering.mean())
    # The student's views are augmented again by nothing here: same views, same scores.
    torch.testing.assert_close(loss.detach(), dino + clustering.mean(), rtol=1e-5, atol=1e-5)


def test_the_clustering_loss_trains_only_the_clustering_layer() -> None:
    L.seed_everything(0, verbose=False)
    model = tiny_model("partial")
    views, h = teacher_embeddings_and_views(model)
    ctx = model.step_context(model.schedule_at(0, 10, 5))
    targets = model.host.cls_targets(ctx, h, None)
    model.host.clustering_loss(ctx, h, targets).backward()
    assert model.clustering.weight.grad is not None
    assert float(model.clustering.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.student.parameters())  # h is detached
    # And the encoder's loss never reaches the clustering layer: a full step's gradient of
    # the clustering layer is the clustering loss's alone.
    model.zero_grad(set_to_none=True)
    one_step(model)
    assert model.student["prototypes"].weight.grad is not None
    assert any(p.grad is not None for p in model.student["backbone"].parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert id(model.clustering.weight) in optimised_parameters(model)
    assert not any(id(p) in optimised_parameters(model) for p in model.teacher.parameters())


def test_training_moves_the_clustering_layer_by_its_optimizer_not_by_the_ema(
    tmp_path: Path,
) -> None:
    L.seed_everything(0, verbose=False)
    initial = tiny_model("partial").clustering.weight.detach().clone()
    model, trainer = fit(tmp_path, "partial", epochs=1)
    assert trainer.global_step == 4
    moved = model.clustering.weight.detach()
    assert not torch.equal(moved, initial)
    # The teacher's EMA copy of the student's prototypes is a different layer.
    assert not torch.equal(model.teacher["prototypes"].weight, moved)
    # Diagnostics measure the prototypes the targets come from: the clustering layer's.
    torch.testing.assert_close(model.prototype_vectors(), F.normalize(moved, dim=1))


@pytest.mark.parametrize("host", ["ibot", "carp"])
def test_partial_is_refused_outside_dino_naming_both_keys(host: str) -> None:
    with pytest.raises(ValueError, match=r"model\.prototypes.*model\.host") as error:
        tiny_model("partial", host=host, carp_block_size=8)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- joint baseline options


@pytest.mark.parametrize(
    ("host", "extra"),
    [
        ("dino", {}),
        ("ibot", TINY_VIT),
        ("carp", {"carp_block_size": 8}),
    ],
)
def test_prototype_init_scale_scales_every_learned_set_and_keeps_the_scores(
    host: str, extra: dict
) -> None:
    scale = 0.25  # a power of two, so "scale x the norms" and the scores are exact
    L.seed_everything(0, verbose=False)
    reference = tiny_model("joint", host=host, **extra)
    L.seed_everything(0, verbose=False)
    scaled = tiny_model("joint", host=host, prototype_init_scale=scale, **extra)
    sets = scaled.prototype_sets.learned
    assert len(sets) == (2 if host == "ibot" else 1)  # iBOT: the separate patch set too
    for ours, theirs in zip(sets, reference.prototype_sets.learned, strict=True):
        assert torch.equal(ours.weight.norm(dim=1), scale * theirs.weight.norm(dim=1))
        assert torch.equal(ours.prototypes(), theirs.prototypes())
    # Every other parameter is drawn as before, and the teacher starts as the student's copy.
    reference_state = reference.state_dict()
    for name, value in scaled.state_dict().items():
        if "prototypes" not in name:
            assert torch.equal(value, reference_state[name]), name
    teacher = scaled.teacher.state_dict()
    for name, value in scaled.student.state_dict().items():
        assert torch.equal(teacher[name], value), name
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    ours, theirs = scaled.prototype_sets, reference.prototype_sets
    assert torch.equal(ours.student(z), theirs.student(z))
    assert torch.equal(ours.teacher_patch(z), theirs.teacher_patch(z))


def test_prototype_init_scale_leaves_decoupled_and_the_clustering_layer_alone() -> None:
    for kind, module in (("decoupled", "gmm"), ("partial", "clustering")):
        L.seed_everything(0, verbose=False)
        reference = getattr(tiny_model(kind), module).state_dict()
        L.seed_everything(0, verbose=False)
        scaled = getattr(tiny_model(kind, prototype_init_scale=0.1), module).state_dict()
        for name, value in reference.items():
            assert torch.equal(scaled[name], value), f"{kind}: {name}"


class RecordGroups(L.Callback):
    """Each step's optimizer groups (lr, weight decay) and schedule, just before it steps."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[tuple[float, float]], dict[str, float]]] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: PrototypicalSSL, optimizer: torch.optim.Optimizer
    ) -> None:
        groups = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        self.steps.append((trainer.global_step, groups, pl_module._current_schedule()))


def test_prototype_lr_multiplier_scales_the_prototype_group_every_step(tmp_path: Path) -> None:
    recorder = RecordGroups()
    model, trainer = fit(
        tmp_path, "joint", epochs=1, callbacks=(recorder,), prototype_lr_multiplier=3.0
    )
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 3
    assert groups[2]["params"] == [model.student["prototypes"].weight]
    assert [step for step, _, _ in recorder.steps] == [0, 1, 2, 3]
    reference = tiny_model("joint")  # the schedules of a plain module: same lr and decay
    for step, recorded, schedule in recorder.steps:
        expected = reference.schedule_at(step, 4, 4)
        assert schedule == expected
        lr, wd = expected["lr"], expected["weight_decay"]
        assert recorded == [(lr, wd), (lr, 0.0), (lr * 3.0, wd)], step
    # The same parameters are optimised as without the option, only regrouped; the
    # prototypes were in the decayed group and stay decayed.
    plain = [{id(p) for p in g["params"]} for g in reference.configure_optimizers().param_groups]
    ours = [{id(p) for p in g["params"]} for g in model.configure_optimizers().param_groups]
    by_name = {id(p): n for n, p in model.named_parameters()}
    assert {by_name[i] for i in ours[2]} == {"student.prototypes.weight"}
    assert len(ours[0] | ours[2]) == len(plain[0]) and len(ours[1]) == len(plain[1])


@pytest.mark.parametrize("kind", ["joint", "decoupled", "partial"])
def test_the_default_optimizer_keeps_dinos_two_groups(kind: str) -> None:
    model = tiny_model(kind)
    groups = model.configure_optimizers().param_groups
    decayed = [
        p for n, p in model.student.named_parameters() if p.ndim > 1 and not n.endswith(".bias")
    ]
    assert len(groups) == 2 and groups[0]["params"] == decayed
    assert model.group_schedule == [(1.0, True), (1.0, False)]
    # Decoupled: the mixture has no parameters, so the multiplier changes nothing.
    if kind == "decoupled":
        other = tiny_model(kind, prototype_lr_multiplier=3.0).configure_optimizers()
        assert len(other.param_groups) == 2


def test_schedule_steps_runs_the_first_steps_of_a_longer_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import protogmm.training.module as module

    momenta: list[float] = []
    update_ema = module.update_ema_

    def recording_update_ema(teacher: object, student: object, momentum: float) -> None:
        momenta.append(momentum)
        update_ema(teacher, student, momentum)

    monkeypatch.setattr(module, "update_ema_", recording_update_ema)
    recorder = RecordGroups()
    model, trainer = fit(tmp_path, "joint", epochs=1, callbacks=(recorder,), schedule_steps=40)
    assert trainer.global_step == 4 and model.schedule_horizon() == 40
    assert model.hparams.schedule_steps == 40
    assert "schedule_steps: 40" in (tmp_path / "hparams.yaml").read_text()
    # A plain module's schedule over a 40-step horizon (4 steps per epoch), at the same steps.
    reference = tiny_model("joint")
    for (step, groups, schedule), momentum in zip(recorder.steps, momenta, strict=True):
        expected = reference.schedule_at(step, 40, 4)
        assert schedule == expected, step
        assert groups == [(expected["lr"], expected["weight_decay"]), (expected["lr"], 0.0)]
        assert momentum == expected["teacher_momentum"], step
    # Warm-up (0.5 epoch) stays in epochs of the real loader: peak lr at step 2, then the
    # cosine has barely started (the run's own horizon would have ended it at step 4).
    assert recorder.steps[2][2]["lr"] == pytest.approx(model.hparams.lr)
    assert recorder.steps[3][2]["lr"] > 0.99 * model.hparams.lr


def test_schedule_steps_sets_the_gmm_annealing(tmp_path: Path) -> None:
    model, trainer = fit(
        tmp_path, "decoupled", epochs=1, schedule_steps=40, gmm_anneal_fraction=0.5
    )
    assert trainer.global_step == 4
    assert model.gmm.anneal_steps == 20  # 0.5 x 40, not 0.5 x the run's 4 steps
    assert model.gmm.beta < 1.0


def test_schedule_epochs_count_the_loader_when_max_steps_ends_the_run(tmp_path: Path) -> None:
    # 5 epochs of 4 batches, cut at 3 steps: an epoch is still 4 steps, not 3 // 5 -> 1.
    with pytest.warns(UserWarning, match=r"model\.schedule_steps=2 is shorter .* 3 "):
        model, trainer = fit(tmp_path, "joint", epochs=5, max_steps=3, schedule_steps=2)
    assert trainer.global_step == 3
    assert model.steps_per_epoch() == 4


@pytest.mark.parametrize(
    ("key", "value", "culprit"),
    [
        ("prototype_init_scale", 0.0, "prototypes.init_scale"),
        ("prototype_init_scale", -0.1, "prototypes.init_scale"),
        ("prototype_init_scale", float("nan"), "prototypes.init_scale"),
        ("prototype_lr_multiplier", 0.0, "prototypes.lr_multiplier"),
        ("prototype_lr_multiplier", float("inf"), "prototypes.lr_multiplier"),
        ("schedule_steps", 0, "schedule_steps"),
        ("schedule_steps", 2.5, "schedule_steps"),
        ("schedule_steps", True, "schedule_steps"),
    ],
)
def test_bad_joint_baseline_option_is_one_line_naming_the_key(
    key: str, value: object, culprit: str
) -> None:
    with pytest.raises(ValueError, match=rf"model\.{culprit}") as error:
        tiny_model("joint", **{key: value})
    assert "\n" not in str(error.value)
