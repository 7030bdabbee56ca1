"""The iBOT and CARP hosts and KoLeo-proto in PrototypicalSSL, end to end on tiny data (CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import (
    HALF_EPOCH_WARMUP,
    STEP_BY_STEP,
    TINY_CONVNET,
    TINY_SHAPES,
    TINY_VIT,
    fit_tiny,
    logged,
    one_step,
    training_batch,
)
from protogmm.hosts import StepContext
from protogmm.hosts.ibot import embed_tokens
from protogmm.prototypes.kinds import PrototypeKind
from protogmm.prototypes.koleo import koleo_proto_loss
from protogmm.training.module import PrototypicalSSL

#: The tiny model without its backbone (the host picks it), a half-epoch warm-up, CARP's
#: blocks of 8 of the 32 prototypes, iBOT masking every patch.
MODEL = TINY_SHAPES | HALF_EPOCH_WARMUP | {"carp_block_size": 8, "ibot_mask_probability": 1.0}
#: The step of the schedules a step outside a trainer takes: past the prototype freeze.
STEP = 5


def host_options(host: str, kind: str, **kwargs: object) -> dict[str, object]:
    """The tiny model for ``host``: a one-block ViT for iBOT (patch tokens), else the ConvNet."""
    backbone = TINY_VIT if host == "ibot" else TINY_CONVNET
    return MODEL | backbone | {"host": host, "prototypes": kind} | kwargs


def host_model(host: str, kind: str, **kwargs: object) -> PrototypicalSSL:
    return PrototypicalSSL.from_hparams(host_options(host, kind, **kwargs))


def fit(
    tmp_path: Path,
    host: str,
    kind: str,
    epochs: int = 1,
    ckpt_path: str | None = None,
    crash_at_step: int | None = None,
    **kw: object,
) -> tuple[PrototypicalSSL, L.Trainer]:
    return fit_tiny(
        tmp_path,
        host_options(host, kind, **kw),
        ckpt_path=ckpt_path,
        crash_at_step=crash_at_step,
        max_epochs=epochs,
        **STEP_BY_STEP,
    )


# ---------------------------------------------------------------- every host trains
@pytest.mark.parametrize(
    ("host", "kind", "extra"),
    [
        ("ibot", "joint", {}),
        ("ibot", "decoupled", {}),
        ("carp", "joint", {"koleo_weight": 0.1}),
        ("carp", "decoupled", {}),
    ],
)
def test_host_trains_through_lightning(tmp_path: Path, host: str, kind: str, extra: dict) -> None:
    model, trainer = fit(tmp_path, host, kind, **extra)
    assert trainer.global_step == 4
    losses = logged(tmp_path, "train/loss")
    assert len(losses) == 4 and all(math.isfinite(v) for _, v in losses)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    terms = ("train/cls_loss", "train/patch_loss") if host == "ibot" else ("train/consistency",)
    for column in (*terms, "knn/top1", "unique_pct/eps=0.025"):
        assert column in header, column
    if host == "carp":
        assert int(model.host.objective.num_partitions) == 4  # one fresh partition per step
    if kind == "decoupled":
        assert model.gmm.step == 4
        if host == "ibot" and model.patch_gmm is not None:
            assert model.patch_gmm.step == 4
    if extra.get("koleo_weight"):
        assert "train/koleo" in header


@pytest.mark.parametrize("host", ["ibot", "carp"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, host: str) -> None:
    # Masks, patch subsets (functions of the step) and CARP's partition counter (a buffer)
    # must continue exactly where the checkpoint left them.
    fit(tmp_path / "full", host, "decoupled", epochs=2, ibot_patch_gmm_samples=40)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(
            tmp_path / "first",
            host,
            "decoupled",
            epochs=2,
            crash_at_step=6,
            ibot_patch_gmm_samples=40,
        )
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    resumed, _ = fit(
        tmp_path / "resumed",
        host,
        "decoupled",
        epochs=2,
        ckpt_path=str(checkpoint),
        ibot_patch_gmm_samples=40,
    )
    full = dict(logged(tmp_path / "full", "train/loss"))
    again = dict(logged(tmp_path / "resumed", "train/loss"))
    assert sorted(again) == [4, 5, 6, 7]
    for step, loss in again.items():
        assert loss == pytest.approx(full[step], abs=1e-6), step


@pytest.mark.parametrize(
    ("host", "extra"),
    [
        ("ibot", {"ibot_patch_prototypes": "shared", "targets": "posterior"}),
        ("ibot", {"targets": "posterior", "target_balancing": "sinkhorn"}),
        ("ibot", {"head_bn": True}),  # BN in the head: every patch token is projected
        ("carp", {"targets": "posterior", "gmm": {"top_k": None}}),
    ],
)
def test_decoupled_variants_take_a_finite_step(host: str, extra: dict) -> None:
    L.seed_everything(0, verbose=False)
    model = host_model(host, "decoupled", **extra)
    loss = one_step(model, step=STEP)
    assert math.isfinite(loss.item())
    assert model.gmm.step == 1
    if extra.get("ibot_patch_prototypes") == "shared":
        assert model.patch_gmm is None and model.prototype_sets.student_patch is model.gmm
    assert any(p.grad is not None for p in model.student["backbone"].parameters())


def test_carp_refuses_a_truncated_posterior_as_targets() -> None:
    # CARP renormalises the targets within each block: blocks holding none of a row's top_k
    # components would be uniform targets, with no gradient (a float64 check: 36 % of the
    # (row, block) targets of a small run were exactly uniform).
    with pytest.raises(
        ValueError, match=r"^model\.prototypes\.targets 'posterior' with model\.host CARP"
    ):
        host_model("carp", "decoupled", targets="posterior", gmm={"top_k": 2})


@pytest.mark.parametrize(("host", "student_scorings"), [("dino", 0), ("ibot", 0), ("carp", 1)])
def test_a_truncated_fit_scores_the_teacher_once_for_every_host(
    host: str, student_scorings: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncated EM scores the teacher anyway: every host's targets take those scores, so
    the mixture scores nothing else but CARP's student (DINO's and iBOT's [CLS] losses take
    the fixed prototypes directly)."""
    L.seed_everything(0, verbose=False)
    model = host_model(host, "decoupled", gmm={"top_k": 2, "init_samples": 0})
    one_step(model, step=STEP)  # initialises the mixture on the first batch
    calls: list[int] = []
    forward = type(model.gmm).forward

    def counted(gmm: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        if gmm is model.gmm:
            calls.append(z.shape[0])
        return forward(gmm, z)

    monkeypatch.setattr(type(model.gmm), "forward", counted)
    model.zero_grad()
    assert math.isfinite(one_step(model, step=STEP + 1).item())
    assert len(calls) == student_scorings, calls


# ---------------------------------------------------------------- iBOT wiring
@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_ibot_gradients_reach_the_mask_token_and_the_student_only(kind: str) -> None:
    L.seed_everything(0, verbose=False)
    model = host_model("ibot", kind)
    one_step(model, step=STEP)
    assert model.student["backbone"].mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    if kind == "joint":
        for prototypes in model.prototype_sets.learned:
            assert prototypes.weight.grad.abs().sum() > 0
        assert len(model.prototype_sets.learned) == 2  # [CLS] and separate patch sets
    else:
        for mixture in (model.gmm, model.patch_gmm):
            assert mixture.step == 1 and list(mixture.parameters()) == []


def test_ibot_patch_loss_in_the_step_equals_the_objective_on_the_same_tensors() -> None:
    L.seed_everything(0, verbose=False)
    model = host_model("ibot", "joint", ibot_patch_weight=0.0)
    twin = host_model("ibot", "joint")
    twin.load_state_dict(model.state_dict())
    step_batch = training_batch()
    views = step_batch[0]
    # The same masks in both (a function of seed, rank and step): the difference of the two
    # losses is the patch loss, computed here independently from the same embeddings.
    ctx, twin_ctx = (m.step_context(m.schedule_at(STEP, 10, 4)) for m in (model, twin))
    masks = model.host.masks(ctx, 2 * views[0].shape[0])
    assert torch.equal(masks, twin.host.masks(twin_ctx, 2 * views[0].shape[0]))
    with torch.no_grad():
        global_views = torch.cat(views[:2])
        _, teacher_patches = embed_tokens(twin.teacher, global_views)
        _, patch_tokens = twin.student["backbone"].forward_tokens(global_views, masks)
        student_masked = twin.student["head"](patch_tokens[masks.flatten(1)])
        teacher_scores = twin.prototype_sets.teacher_patch(teacher_patches.flatten(0, 1))
        targets = torch.softmax(
            teacher_scores.view(*teacher_patches.shape[:2], -1)[masks.flatten(1)] / 0.07, dim=-1
        )  # the patch centre starts at 0, tau_t2 = 0.07 without warm-up
        student_log_p = torch.log_softmax(
            twin.prototype_sets.student_patch(student_masked).double() / 0.1, dim=-1
        )
        per_token = -(targets.double() * student_log_p).sum(-1)
        counts = masks.flatten(1).sum(1)
        per_image = torch.zeros(len(counts), dtype=torch.float64).index_add(
            0, masks.flatten(1).nonzero()[:, 0], per_token
        ) / counts.clamp_min(1)
        expected = per_image.view(2, -1).mean(1).mean().item()
    with_patch = one_step(twin, step_batch, step=STEP).item()
    without_patch = one_step(model, step_batch, step=STEP).item()
    assert with_patch - without_patch == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_ibot_patch_gmm_sees_a_bounded_seeded_subset() -> None:
    model = host_model("ibot", "decoupled", ibot_patch_gmm_samples=30)
    patches = torch.randn(8, 16, 16)
    ctx = model.step_context({})
    first, again = model.host.sample_patches(ctx, patches), model.host.sample_patches(ctx, patches)
    assert first.shape == (30, 16) and torch.equal(first, again)
    rows = {tuple(row.tolist()) for row in patches.flatten(0, 1)}
    assert all(tuple(row.tolist()) in rows for row in first)
    assert len({tuple(row.tolist()) for row in first}) == 30  # without replacement
    other = host_model("ibot", "decoupled", ibot_patch_gmm_samples=30, host_seed=1)
    assert not torch.equal(other.host.sample_patches(other.step_context({}), patches), first)
    assert model.host.sample_patches(ctx, patches[:1]).shape == (16, 16)  # all, if fewer


def test_step_seeds_differ_by_purpose_seed_and_step() -> None:
    model, ctx = host_model("ibot", "joint"), StepContext(*([None] * 4), step=3)
    seeds = {model.host.step_seed(ctx, "ibot-mask"), model.host.step_seed(ctx, "ibot-patch-subset")}
    seeds.add(host_model("ibot", "joint", host_seed=7).host.step_seed(ctx, "ibot-mask"))
    seeds.add(model.host.step_seed(StepContext(*([None] * 4), step=4), "ibot-mask"))
    seeds.add(model.host.step_seed(StepContext(*([None] * 4), step=3, rank=1), "ibot-mask"))
    assert len(seeds) == 5
    masks = model.host.masks(ctx, 16)
    assert masks.shape == (16, 4, 4) and masks.any()


@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_diagnose_reads_the_separate_patch_prototypes(tmp_path: Path, kind: str) -> None:
    from protogmm.diagnostics import load_prototypes

    model = host_model("ibot", kind, ibot_num_patch_prototypes=24)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "run.ckpt")
    shapes = {name: tuple(m.shape) for name, m in load_prototypes(tmp_path / "run.ckpt").items()}
    if kind == "joint":
        assert shapes["teacher/patch.prototypes"] == (24, 16)
        assert shapes["teacher/prototypes"] == (32, 16)
    else:
        assert shapes == {"gmm": (32, 16), "patch.gmm": (24, 16)}


# ---------------------------------------------------------------- KoLeo-proto
def test_koleo_adds_its_weighted_formula_to_the_host_loss() -> None:
    L.seed_everything(0, verbose=False)
    plain = host_model("carp", "joint")
    regularised = host_model("carp", "joint", koleo_weight=0.5)
    regularised.load_state_dict(plain.state_dict())
    step_batch = training_batch()
    difference = (
        one_step(regularised, step_batch, step=STEP).item()
        - one_step(plain, step_batch, step=STEP).item()
    )
    # Reference: -(1/K) sum_k log min_j ||c_k - c_j|| on the normalised rows, float64.
    c = torch.nn.functional.normalize(plain.student["prototypes"].weight.detach().double(), dim=1)
    distances = torch.cdist(c, c) + torch.diag(torch.full((len(c),), math.inf))
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean().item()
    assert difference == pytest.approx(0.5 * expected, rel=1e-4)
    assert koleo_proto_loss(c).item() == pytest.approx(expected, rel=1e-9)


def test_koleo_gradient_pushes_the_nearest_learned_prototypes_apart() -> None:
    L.seed_everything(0, verbose=False)
    model = host_model("carp", "joint", koleo_weight=1.0, carp_entropy_weight=0.0)
    weight = model.student["prototypes"].weight
    with torch.no_grad():
        weight[1] = weight[0] + 0.01 * torch.randn_like(weight[0])  # a near-duplicate pair

    def nearest() -> float:
        c = torch.nn.functional.normalize(weight.detach(), dim=1)
        return torch.cdist(c, c).fill_diagonal_(math.inf).min().item()

    before = nearest()
    model.zero_grad()
    koleo = koleo_proto_loss(weight)
    koleo.backward()
    with torch.no_grad():
        weight -= 0.01 * weight.grad
    assert nearest() > before


def test_ibot_joint_koleo_regularises_both_sets() -> None:
    L.seed_everything(0, verbose=False)
    model = host_model("ibot", "joint", koleo_weight=1.0)
    assert len(model.prototype_sets.learned) == 2
    one_step(model, step=STEP)
    assert model.student["patch"]["prototypes"].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("host", "kwargs", "culprit"),
    [
        ("ibot", {"backbone": "convnet", "backbone_kwargs": {"width": 8}}, "model.host"),
        ("carp", {"carp_block_size": 5}, "model.host.block_size"),
        ("carp", {"carp_block_size": 1}, "model.host.block_size"),
        ("ibot", {"ibot_mask_ratio": (0.1, 1.0)}, "model.host.mask_ratio"),
        ("ibot", {"ibot_mask_ratio": (-0.1, 0.5)}, "model.host.mask_ratio"),
        ("ibot", {"ibot_mask_probability": 2.0}, "model.host.mask_probability"),
        ("carp", {"koleo_weight": -0.1, "prototypes": "joint"}, "model.prototypes.koleo_weight"),
        ("dino", {"host": "swav"}, "model.host"),
        (
            "ibot",
            {"ibot_num_patch_prototypes": 16, "ibot_patch_prototypes": "shared"},
            "model.host.num_patch_prototypes",
        ),
        ("carp", {"carp_temperature": 0.0}, "model.host.temperature"),
    ],
)
def test_bad_host_config_names_the_key(host: str, kwargs: dict, culprit: str) -> None:
    kind = kwargs.pop("prototypes", "decoupled")
    host = kwargs.pop("host", host)
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")) as error:
        host_model(host, kind, **kwargs)
    assert "\n" not in str(error.value)


def test_an_option_of_another_kind_is_refused_naming_it() -> None:
    """KoLeo-proto regularises learned prototypes: a decoupled mixture has no such option."""
    spec = {"class_path": "Decoupled", "init_args": {"koleo_weight": 0.1}}
    with pytest.raises(ValueError, match=r"model\.prototypes: Decoupled has no option.*koleo"):
        PrototypeKind.build(spec, "model.prototypes")


@pytest.mark.parametrize("host", ["dino", "carp"])
def test_a_host_without_masks_leaves_the_mask_token_out_of_the_gradient(host: str) -> None:
    """DDP refuses a trainable parameter that no loss reaches (a DINO ViT failed on it)."""
    model = host_model(host, "joint", carp_block_size=8, **TINY_VIT)
    assert not model.student["backbone"].mask_token.requires_grad
    assert "student.backbone.mask_token" in model.state_dict()  # checkpoints keep it
    one_step(model, step=STEP)
    unused = [
        name
        for name, param in model.student.named_parameters()
        if param.requires_grad and param.grad is None
    ]
    assert unused == []
    assert host_model("ibot", "joint").student["backbone"].mask_token.requires_grad


@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_an_ibot_step_without_any_masked_patch_trains_and_touches_every_parameter(
    kind: str,
) -> None:
    """iBOT masks each image with a probability: a process may get no masked patch at all
    (2 images per GPU failed under DDP). Its patch loss is 0 and every trainable parameter
    still gets a gradient (DDP requires it)."""
    L.seed_everything(0, verbose=False)
    model = host_model("ibot", kind, ibot_mask_probability=0.0)
    loss = one_step(model, step=STEP)
    assert math.isfinite(loss.item())
    assert logged_patch_loss(model) == 0.0
    missing = [n for n, p in model.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def logged_patch_loss(model: PrototypicalSSL) -> float:
    """The patch loss of a step run again on the same batch (the step's own metric)."""
    ctx = model.step_context(model.schedule_at(STEP, 10, 4))
    return float(model.host.step(ctx, training_batch()[0]).metrics["train/patch_loss"])
