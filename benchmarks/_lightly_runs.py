"""The runs behind :mod:`benchmarks.lightly_side_by_side`, each in its own fresh process.

lightly's DINO trained by hand after lightly's example loop (:func:`train_lightly`, with
protogmm's recipe or lightly's CIFAR-10 one), protogmm's ``fit`` run
(:func:`train_protogmm`), measured alike by :mod:`benchmarks._lightly_child`. lightly is
imported only inside the lightly runs (it is an optional dependency). The parent side
(checking lightly, launching the children, the report) stays in
:mod:`benchmarks.lightly_side_by_side`, which re-exports every name here.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ._common import column, train_run

#: What the lightly runs import; the installed lightly is checked by importing exactly these.
LIGHTLY_MODULES = (
    "lightly.loss",
    "lightly.models.modules",
    "lightly.models.utils",
    "lightly.utils.scheduler",
)
#: The ε at which the teacher's unique prototypes are counted (Definition 2.1).
EPS = (0.025, 0.1, 0.25, 0.5)

#: lightly's CIFAR-10 benchmark (cifar10_benchmark.py, DINOModel): what the second lightly
#: run keeps from it.
CIFAR10_RECIPE: dict[str, Any] = {
    "output_dim": 2048,
    "hidden_dim": 2048,
    "bottleneck_dim": 256,
    "lr": 0.06,  # x batch / 128
    "sgd_momentum": 0.9,
    "weight_decay": 5e-4,
    "ema_momentum": 0.99,
}


# ---------------------------------------------------------------------------- children
def protogmm_defaults() -> dict[str, Any]:
    """``PrototypicalSSL``'s default hyperparameters: the recipe both trainers share."""
    import inspect

    from protogmm.hosts import DINO
    from protogmm.prototypes import Joint
    from protogmm.training.module import PrototypicalSSL

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(PrototypicalSSL.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    # The host's (temperatures, centre) and the joint prototypes' (the last layer's freeze).
    defaults |= DINO().init_args()
    defaults["freeze_prototypes_epochs"] = Joint().freeze_epochs
    return defaults


def teacher_knn(backbone: Any, datamodule: Any, device: Any) -> tuple[float, float]:
    """k-NN top-1 of ``backbone`` on the held-out split (DINO's and lightly's protocol)."""
    from protogmm.evaluation import knn_accuracy
    from protogmm.evaluation.features import extract_features

    train_loader, test_loader = datamodule.knn_dataloaders()
    train_x, train_y = extract_features(backbone, train_loader, device)
    test_x, test_y = extract_features(backbone, test_loader, device)
    return (
        knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07),
        knn_accuracy(train_x, train_y, test_x, test_y, k=200, temperature=0.1),
    )


def lightly_networks(
    recipe: str, feature_dim: int, defaults: dict[str, Any]
) -> tuple[Any, Any, int]:
    """Student and teacher heads of lightly's DINO for ``recipe``, and their K.

    ``"protogmm"``: lightly's ``DINOProjectionHead`` with protogmm's default sizes (3
    Linear layers, like protogmm's ``head_layers``), the last layer frozen for protogmm's
    ``freeze_prototypes_epochs``, the teacher starting as the student. ``"cifar10"``: the
    head of lightly's ``cifar10_benchmark.py`` (its MLP replaced by 2 layers), the teacher's
    initialised apart as there.
    """
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.modules.heads import ProjectionHead
    from torch import nn

    if recipe == "protogmm":
        output_dim = defaults["num_prototypes"]

        def head(freeze_epochs: int) -> nn.Module:
            return DINOProjectionHead(
                feature_dim,
                defaults["hidden_dim"],
                defaults["bottleneck_dim"],
                output_dim,
                batch_norm=defaults["head_bn"],
                freeze_last_layer=freeze_epochs,
            )

        student, teacher = head(int(defaults["freeze_prototypes_epochs"])), head(-1)
        # The teacher starts as the student (DINO; protogmm's make_teacher). A deepcopy
        # fails on lightly's weight-normed last layer, so copy the state as DINO does.
        teacher.load_state_dict(student.state_dict())
        return student, teacher, output_dim

    hidden, bottleneck = CIFAR10_RECIPE["hidden_dim"], CIFAR10_RECIPE["bottleneck_dim"]

    def cifar_head() -> nn.Module:
        built = DINOProjectionHead(
            feature_dim, hidden, bottleneck, CIFAR10_RECIPE["output_dim"], batch_norm=True
        )
        built.layers = ProjectionHead(
            [
                (feature_dim, hidden, nn.BatchNorm1d(hidden), nn.GELU()),
                (hidden, bottleneck, None, None),
            ]
        ).layers
        return built

    return cifar_head(), cifar_head(), CIFAR10_RECIPE["output_dim"]


def lightly_optimizer(
    recipe: str, student: Any, defaults: dict[str, Any], epochs: int, batch_size: int
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer of ``recipe`` and its per-epoch scheduler (None: set per step).

    ``"protogmm"``: protogmm's ``configure_optimizers`` (AdamW; weights decayed, biases and
    norms not). ``"cifar10"``: SGD with lightly's learning rate, momentum and weight decay,
    and a cosine learning rate per epoch.
    """
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if recipe == "protogmm":
        decayed = [p for n, p in trainable if p.ndim > 1 and not n.endswith(".bias")]
        not_decayed = [p for n, p in trainable if p.ndim <= 1 or n.endswith(".bias")]
        optimizer = torch.optim.AdamW(
            [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}],
            lr=defaults["lr"],
            weight_decay=defaults["weight_decay"],
        )
        return optimizer, None
    optimizer = torch.optim.SGD(
        [p for _, p in trainable],
        lr=CIFAR10_RECIPE["lr"] * batch_size / 128,
        momentum=CIFAR10_RECIPE["sgd_momentum"],
        weight_decay=CIFAR10_RECIPE["weight_decay"],
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)


def lightly_models(
    recipe: str, datamodule: Any, defaults: dict[str, Any], device: torch.device
) -> tuple[Any, Any, int]:
    """Student and teacher (``ModuleDict`` of ``backbone`` and ``head``) and their K.

    The two ConvNets start equal (the teacher as the student); the heads are
    :func:`lightly_networks`'; the teacher takes no gradient.
    """
    from lightly.models.utils import deactivate_requires_grad
    from torch import nn

    from protogmm.models import build_backbone

    backbones = [
        build_backbone(
            "convnet", in_channels=datamodule.in_channels, image_size=datamodule.image_size
        )
        for _ in range(2)
    ]
    backbones[1].load_state_dict(backbones[0].state_dict())  # the teacher starts equal
    student_head, teacher_head, output_dim = lightly_networks(
        recipe, backbones[0].feature_dim, defaults
    )
    student = nn.ModuleDict({"backbone": backbones[0], "head": student_head}).to(device)
    teacher = nn.ModuleDict({"backbone": backbones[1], "head": teacher_head}).to(device)
    deactivate_requires_grad(teacher)
    return student, teacher, output_dim


def lightly_step_schedule(
    recipe: str,
    optimizer: torch.optim.Optimizer,
    defaults: dict[str, Any],
    step: int,
    epoch: int,
    steps: tuple[int, int, int],
) -> tuple[float, dict[str, Any]]:
    """Set this step's learning rate and weight decay; its EMA momentum and loss arguments.

    ``"protogmm"``: protogmm's per-step schedules (training/module.py, ``schedule_at``),
    the teacher temperature passed to lightly's loss. ``"cifar10"``: a fixed momentum and
    the epoch (lightly's loss warms its teacher temperature up by epoch); the learning rate
    is the per-epoch scheduler's.

    Args:
        steps: ``(total steps, learning-rate warm-up steps, temperature warm-up steps)``.
    """
    from lightly.utils.scheduler import cosine_schedule

    from protogmm.schedules import cosine_ramp, linear_ramp, warmup_cosine

    if recipe != "protogmm":
        return CIFAR10_RECIPE["ema_momentum"], {"epoch": epoch}
    total_steps, warmup_steps, tau_warmup_steps = steps
    lr = warmup_cosine(step, total_steps, warmup_steps, defaults["lr"], defaults["min_lr"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = cosine_ramp(
        step, total_steps, defaults["weight_decay"], defaults["weight_decay_end"]
    )
    momentum = cosine_schedule(step, total_steps, defaults["teacher_momentum"], 1.0)
    tau = linear_ramp(
        step,
        tau_warmup_steps,
        defaults["warmup_teacher_temperature"],
        defaults["teacher_temperature"],
    )
    return momentum, {"teacher_temp": tau}


def lightly_evaluation(teacher: Any, datamodule: Any, device: torch.device) -> dict[str, Any]:
    """k-NN of the teacher backbone and unique % of its head's prototypes at :data:`EPS`."""
    from protogmm.diagnostics import unique_prototype_curve

    knn20, knn200 = teacher_knn(teacher["backbone"], datamodule, device)
    last_layer = teacher["head"].last_layer
    with torch.no_grad():
        # weight_norm's hook recomputes the effective weight g * v / ||v|| at each forward.
        last_layer(torch.zeros(1, last_layer.in_features, device=device))
        prototypes = last_layer.weight.detach().float().cpu()
    counts = unique_prototype_curve(prototypes, EPS)
    return {
        "knn_k20": knn20,
        "knn_k200": knn200,
        "unique_pct": {f"{eps:g}": 100.0 * counts[eps] / prototypes.shape[0] for eps in EPS},
        "num_prototypes": prototypes.shape[0],
    }


def train_lightly(spec: dict[str, Any]) -> dict[str, Any]:
    """Train lightly's DINO by hand (lightly's example loop) and evaluate it like protogmm."""
    import lightning as L
    from lightly.loss import DINOLoss
    from lightly.models.utils import update_momentum
    from torch import nn

    from protogmm.training.datamodule import SSLDataModule

    recipe, seed, epochs = spec["recipe"], spec["seed"], spec["epochs"]
    batch_size = spec["data"]["batch_size"]
    defaults = protogmm_defaults()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    L.seed_everything(seed, verbose=False)
    datamodule = SSLDataModule(seed=seed, **spec["data"])
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    steps_per_epoch = len(loader)
    student, teacher, output_dim = lightly_models(recipe, datamodule, defaults, device)
    if recipe == "protogmm":
        # The teacher temperature is passed per step (protogmm's linear warm-up per step).
        criterion = DINOLoss(
            output_dim=output_dim,
            student_temp=defaults["student_temperature"],
            center_momentum=defaults["center_momentum"],
        ).to(device)
    else:
        criterion = DINOLoss(output_dim=output_dim).to(device)  # cifar10_benchmark.py
    optimizer, scheduler = lightly_optimizer(recipe, student, defaults, epochs, batch_size)
    steps = (
        epochs * steps_per_epoch,
        int(defaults["warmup_epochs"] * steps_per_epoch),
        int(defaults["teacher_temperature_warmup_epochs"] * steps_per_epoch),
    )

    def forward(net: nn.ModuleDict, view: torch.Tensor) -> torch.Tensor:
        return net["head"](net["backbone"](view).flatten(start_dim=1))

    epoch_seconds, step, last_loss = [], 0, float("nan")
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for views, _ in loader:
            momentum, loss_kwargs = lightly_step_schedule(
                recipe, optimizer, defaults, step, epoch, steps
            )
            # lightly's example: the teacher moves at the start of the step.
            update_momentum(student["backbone"], teacher["backbone"], m=momentum)
            update_momentum(student["head"], teacher["head"], m=momentum)
            views = [view.to(device, non_blocking=True) for view in views]
            teacher_out = [forward(teacher, view) for view in views[:2]]
            student_out = [forward(student, view) for view in views]
            loss = criterion(teacher_out, student_out, **loss_kwargs)
            loss.backward()
            student["head"].cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            optimizer.zero_grad()
            last_loss = float(loss.detach())
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - start)
        if scheduler is not None:
            scheduler.step()

    evaluation = lightly_evaluation(teacher, datamodule, device)
    return {
        "steps": step,
        "seconds_per_epoch": statistics.mean(epoch_seconds),
        "images_per_second": step * batch_size / sum(epoch_seconds),
        **evaluation,
        "final_loss": last_loss,
    }


def train_protogmm(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``protogmm fit`` run of ``_common.train_run`` with ``spec``'s overrides."""
    summary = train_run(
        Path(spec["run_dir"]),
        epochs=spec["epochs"],
        seed=spec["seed"],
        model=spec["overrides"],
        data=spec["data"],
        # No dense collapse measurements inside the timed epochs (the lightly loop has
        # none); the end-of-epoch measurement, outside the epoch timer, still runs.
        dense_every_n_steps=10**9,
    )
    losses = column(summary, "train/loss")
    return {
        "steps": summary["steps"],
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "images_per_second": summary["steps"]
        * spec["data"]["batch_size"]
        / (summary["seconds_per_epoch"] * spec["epochs"]),
        "knn_k20": summary["knn/top1"],
        "knn_k200": summary["knn/top1_k200"],
        "unique_pct": summary["unique_pct"],
        "num_prototypes": summary["num_prototypes"],
        "final_loss": losses[-1] if losses else float("nan"),
        "knn_untrained": (summary["knn/untrained"], summary["knn/untrained_k200"]),
        "knn_pixels": (summary["knn/pixels"], summary["knn/pixels_k200"]),
    }
