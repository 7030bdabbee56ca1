"""Side by side with lightly: lightly's DINO against protogmm's DINO, joint and decoupled.

    scripts/dev python -m benchmarks.lightly_side_by_side           # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.lightly_side_by_side --quick   # smoke run (a few minutes)

lightly is an optional dependency of protogmm, the ``benchmarks`` extra (``lightly==1.6.0``):
``pip install 'protogmm[benchmarks]'``, or in a clone ``scripts/dev python -m pip install -e
'.[benchmarks]'``. The runs use ``lightly.loss``, ``lightly.models.modules``,
``lightly.models.utils`` and ``lightly.utils.scheduler`` only. Where lightly is missing, or
is another version, the script says so in one line (with that install command) and exits 3.

Every run trains the same ConvNet (``build_backbone("convnet", in_channels=1)``) on the
embedded MNIST-5k with the same data module (``SSLDataModule``: 2 global + 2 local crops,
batch 128, the same order for a seed), for the same epochs, in its own fresh process, the
runs alternating (their order rotates from seed to seed):

* **lightly DINO, protogmm's recipe**: lightly's ``DINOProjectionHead`` + ``DINOLoss`` in a
  hand-written loop after lightly's DINO example (EMA teacher with lightly's
  ``cosine_schedule`` momentum, last layer frozen for the first epoch), with every
  hyperparameter of protogmm's defaults (``PrototypicalSSL``: head sizes, K, temperatures,
  AdamW, learning-rate and weight-decay schedules): the like-for-like comparison;
* **lightly DINO, its CIFAR-10 recipe**: lightly's CIFAR-10 benchmark settings
  (``docs/source/getting_started/benchmarks/cifar10_benchmark.py``: K = 2048, a 2-layer
  2048-256 head, teacher head initialised apart, SGD 0.06 with momentum 0.9 and weight decay
  5e-4, cosine learning rate per epoch, EMA momentum 0.99, no last-layer freeze), adapted
  to this data, backbone and crops;
* **protogmm DINO joint** and **protogmm DINO decoupled**: the ``protogmm fit`` run (the
  ``PrototypicalSSL`` / ``SSLDataModule`` / ``build_trainer`` of ``_common.train_run``).

Reported: training images per second (data loading included, evaluation excluded), peak
memory, k-NN top-1 of the teacher backbone at the end (k = 20, T = 0.07 and k = 200,
T = 0.1, on ``SSLDataModule.knn_dataloaders()``), and unique prototypes of the teacher at
ε = 0.025 / 0.1 / 0.25 / 0.5 (lightly: its last layer's weight-norm effective weight).
Writes the "Side by side with lightly" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from protogmm.reports import markdown_table

from ._common import (
    PeakMemory,
    column,
    command_line,
    machine_line,
    mean_std,
    package_environment,
    quick_model,
    replace_section,
    train_run,
)

#: The lightly the benchmark is written for: pyproject's ``benchmarks`` extra pins it.
LIGHTLY_VERSION = "1.6.0"
#: Ends the one line printed where lightly is missing or another version.
INSTALL_HINT = "install it with: pip install 'protogmm[benchmarks]'"
#: Exit status when lightly is missing or another version.
LIGHTLY_UNAVAILABLE = 3
#: What the lightly runs import; the installed lightly is checked by importing exactly these.
LIGHTLY_MODULES = (
    "lightly.loss",
    "lightly.models.modules",
    "lightly.models.utils",
    "lightly.utils.scheduler",
)
EPS = (0.025, 0.1, 0.25, 0.5)
DATA: dict[str, Any] = {"dataset": "mnist5k", "batch_size": 128, "num_local_crops": 2}

#: label -> what runs it ("lightly" with a recipe, or "protogmm" with PrototypicalSSL
#: overrides).
RUNS: dict[str, dict[str, Any]] = {
    "lightly DINO, protogmm's recipe": {"kind": "lightly", "recipe": "protogmm"},
    "lightly DINO, its CIFAR-10 recipe": {"kind": "lightly", "recipe": "cifar10"},
    "protogmm DINO joint": {"kind": "protogmm", "overrides": {"prototypes": "joint"}},
    "protogmm DINO decoupled": {"kind": "protogmm", "overrides": {"prototypes": "decoupled"}},
}

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


class LightlyUnavailable(RuntimeError):
    """lightly is missing, another version, or does not import; the message is one line."""


def check_lightly() -> str:
    """The installed lightly's version, once the modules the lightly runs use import.

    Raises:
        LightlyUnavailable: lightly is not installed, is not :data:`LIGHTLY_VERSION`, or one
            of :data:`LIGHTLY_MODULES` fails to import; the message says how to install it.
    """
    try:
        version = importlib.metadata.version("lightly")
    except importlib.metadata.PackageNotFoundError:
        raise LightlyUnavailable(f"lightly is not installed; {INSTALL_HINT}") from None
    if version != LIGHTLY_VERSION:
        raise LightlyUnavailable(
            f"found lightly {version}, the benchmark is written for {LIGHTLY_VERSION}; "
            + INSTALL_HINT
        )
    for module in LIGHTLY_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise LightlyUnavailable(
                f"lightly {version} does not import ({module}: {error}); {INSTALL_HINT}"
            ) from None
    return version


# ---------------------------------------------------------------------------- children
def protogmm_defaults() -> dict[str, Any]:
    """``PrototypicalSSL``'s default hyperparameters: the recipe both trainers share."""
    import inspect

    from protogmm.training.module import PrototypicalSSL

    return {
        name: parameter.default
        for name, parameter in inspect.signature(PrototypicalSSL.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


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


def train_lightly(spec: dict[str, Any]) -> dict[str, Any]:
    """Train lightly's DINO by hand (lightly's example loop) and evaluate it like protogmm."""
    import lightning as L
    from lightly.loss import DINOLoss
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch import nn

    from protogmm.diagnostics import unique_prototype_curve
    from protogmm.models import build_backbone
    from protogmm.schedules import cosine_ramp, linear_ramp, warmup_cosine
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
    total_steps = epochs * steps_per_epoch

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
    warmup_steps = int(defaults["warmup_epochs"] * steps_per_epoch)
    tau_warmup_steps = int(defaults["teacher_temperature_warmup_epochs"] * steps_per_epoch)

    def forward(net: nn.ModuleDict, view: torch.Tensor) -> torch.Tensor:
        return net["head"](net["backbone"](view).flatten(start_dim=1))

    epoch_seconds, step, last_loss = [], 0, float("nan")
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for views, _ in loader:
            if recipe == "protogmm":
                # protogmm's per-step schedules (training/module.py, schedule_at).
                lr = warmup_cosine(
                    step, total_steps, warmup_steps, defaults["lr"], defaults["min_lr"]
                )
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
                loss_kwargs: dict[str, Any] = {"teacher_temp": tau}
            else:
                momentum = CIFAR10_RECIPE["ema_momentum"]
                loss_kwargs = {"epoch": epoch}
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

    knn20, knn200 = teacher_knn(teacher["backbone"], datamodule, device)
    last_layer = teacher["head"].last_layer
    with torch.no_grad():
        # weight_norm's hook recomputes the effective weight g * v / ||v|| at each forward.
        last_layer(torch.zeros(1, last_layer.in_features, device=device))
        prototypes = last_layer.weight.detach().float().cpu()
    counts = unique_prototype_curve(prototypes, EPS)
    return {
        "steps": step,
        "seconds_per_epoch": statistics.mean(epoch_seconds),
        "images_per_second": step * batch_size / sum(epoch_seconds),
        "knn_k20": knn20,
        "knn_k200": knn200,
        "unique_pct": {f"{eps:g}": 100.0 * counts[eps] / prototypes.shape[0] for eps in EPS},
        "num_prototypes": prototypes.shape[0],
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


class StepClock:
    """Times every optimizer step of this process, and profiles a few, in any trainer.

    A global optimizer post-step hook (``torch.optim.optimizer.
    register_optimizer_step_post_hook``) fires at the end of each step in lightly's loop
    and in Lightning's alike, so both trainers are timed and profiled by the same code
    without touching either. A step's time is the interval between two consecutive
    optimizer steps: data loading, forward, backward, update and the trainer's own
    bookkeeping. Steps ``skip + 1 .. skip + profile_steps`` (after one warm-up step) run
    under ``torch.profiler``.
    """

    def __init__(self, profile_steps: int, skip: int, cuda: bool) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.cuda = cuda
        self.times: list[float] = []
        self.profile_steps = profile_steps
        #: Steps until the profiled window is complete (wait + warm-up + active).
        self.profile_span = skip + 1 + profile_steps
        self.profiler = None
        if profile_steps:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.profiler = profile(
                activities=activities,
                schedule=schedule(wait=skip, warmup=1, active=profile_steps, repeat=1),
            )

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._on_step)
        if self.profiler is not None:
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.remove()
        if self.profiler is not None:
            self.profiler.__exit__(*exc_info)

    def _on_step(self, *_: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.step()

    @property
    def profiled(self) -> bool:
        """Whether the run had enough steps to complete the profiled window."""
        return self.profiler is not None and len(self.times) >= self.profile_span

    def median_step_seconds(self) -> float:
        """The median interval between consecutive steps (robust to the epoch boundaries,
        where evaluation runs, and to the profiled steps)."""
        intervals = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(intervals) if intervals else float("nan")

    def top_operators(self, top: int) -> tuple[float, list[tuple[str, float]]]:
        """Operators' self time per profiled step (s), and the ``top`` operators' (ms).

        "Operators" are every profiled event but the profiler's own ``ProfilerStep#``
        range, whose self time is the step's time outside them all (Python, the trainer);
        the data loader's ``__next__`` is one of them (the crops are made there).
        """
        if not self.profiled:
            return float("nan"), []
        events = [
            event
            for event in self.profiler.key_averages()
            if not event.key.startswith("ProfilerStep")
        ]

        def self_time(event: Any) -> float:  # microseconds
            if self.cuda:
                return float(getattr(event, "self_device_time_total", 0.0))
            return float(event.self_cpu_time_total)

        total = sum(self_time(event) for event in events) / 1e6 / self.profile_steps
        ranked = sorted(events, key=self_time, reverse=True)[:top]
        return total, [(e.key, self_time(e) / 1e3 / self.profile_steps) for e in ranked]


def child_main(spec: dict[str, Any], result_path: Path) -> int:
    """One run in this (fresh) process; its measurements go to ``result_path`` as JSON."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Import everything the run uses before the memory window opens, so that the window
    # holds what the run itself allocates (model, optimizer, data, activations, the final
    # k-NN), not the libraries: the same modules for every run, plus lightly's for lightly.
    modules = ["protogmm.training.module", "protogmm.training.runner", "protogmm.evaluation"]
    if spec["kind"] == "lightly":
        modules += LIGHTLY_MODULES
    for module in modules:
        importlib.import_module(module)
    start = time.perf_counter()
    clock = StepClock(spec["profile_steps"], spec["profile_skip"], cuda=device == "cuda")
    with PeakMemory(device) as memory, clock:
        if spec["kind"] == "lightly":
            result = train_lightly(spec)
        else:
            result = train_protogmm(spec)
    operator_seconds, top_operators = clock.top_operators(spec["profile_top"])
    result.update(
        {
            "peak_mib": memory.peak_mib,
            "increase_mib": memory.increase_mib,
            "wall_seconds": time.perf_counter() - start,
            "median_step_seconds": clock.median_step_seconds(),
            "operator_seconds_per_step": operator_seconds,
            "top_operators": top_operators,
        }
    )
    result_path.write_text(json.dumps(result))
    return 0


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its measurements."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.lightly_side_by_side",
                "--child",
                json.dumps(spec),
                "--result",
                str(result_path),
            ],
            env=package_environment(),
            capture_output=True,
            text=True,
        )
        if process.returncode != 0 or not result_path.exists():
            raise RuntimeError(
                f"{spec['label']} (seed {spec['seed']}) failed:\n{process.stderr[-4000:]}"
            )
        return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------- report
def results_table(results: dict[str, list[dict[str, Any]]]) -> str:
    header = [
        "run",
        "K",
        "images/s",
        "s/epoch",
        "median s/step",
        "peak MiB (run)",
        "k-NN k=20",
        "k-NN k=200",
        "unique % at ε = " + " / ".join(f"{e:g}" for e in EPS) + " (end)",
        "final loss",
    ]
    rows = []
    for label, runs in results.items():
        unique = " / ".join(
            f"{statistics.mean(r['unique_pct'][f'{e:g}'] for r in runs):.1f}" for e in EPS
        )
        rows.append(
            [
                label,
                f"{runs[0]['num_prototypes']}",
                mean_std([r["images_per_second"] for r in runs], digits=0),
                mean_std([r["seconds_per_epoch"] for r in runs]),
                mean_std([r["median_step_seconds"] for r in runs], digits=3),
                mean_std([r["increase_mib"] for r in runs], digits=0),
                mean_std([r["knn_k20"] for r in runs], 100),
                mean_std([r["knn_k200"] for r in runs], 100),
                unique,
                mean_std([r["final_loss"] for r in runs], digits=2),
            ]
        )
    protogmm_runs = next(runs for label, runs in results.items() if label.startswith("protogmm"))
    for name, key in (("untrained encoder", "knn_untrained"), ("raw pixels", "knn_pixels")):
        row = dict.fromkeys(header, "") | {
            "run": name,
            "k-NN k=20": mean_std([r[key][0] for r in protogmm_runs], 100),
            "k-NN k=200": mean_std([r[key][1] for r in protogmm_runs], 100),
        }
        rows.append(list(row.values()))
    return markdown_table(header, rows)


def profile_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Per run (first seed): its median step, the operators' share of it, the top ones."""
    rows = []
    for label, runs in results.items():
        run = runs[0]
        step, operators = run["median_step_seconds"], run["operator_seconds_per_step"]
        top = "; ".join(f"`{name}` {ms:.0f}" for name, ms in run["top_operators"])
        rows.append(
            [
                label,
                f"{step:.3f}",
                f"{operators:.3f} ({100 * operators / step:.0f} %)" if top else "not profiled",
                top,
            ]
        )
    header = ["run", "median s/step", "operators' self time s/step (share)", "top ms/step"]
    return markdown_table(header, rows)


def data_seconds_per_epoch(data: dict[str, Any], seed: int) -> float:
    """One epoch of the training loader alone (crops made, nothing trained), in seconds.

    Every run draws its batches from this same loader, so this part of an epoch is the
    same work in all of them; what remains of an epoch is the trainer's.
    """
    from protogmm.training.datamodule import SSLDataModule

    datamodule = SSLDataModule(seed=seed, **data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(0)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def findings(results: dict[str, list[dict[str, Any]]], data_seconds: float) -> list[str]:
    """Sentences computed from the numbers: speed and memory of protogmm against lightly."""

    def mean(label: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[label])

    lightly, joint = "lightly DINO, protogmm's recipe", "protogmm DINO joint"
    decoupled = "protogmm DINO decoupled"
    speed = mean(joint, "images_per_second") / mean(lightly, "images_per_second")
    decoupled_speed = mean(decoupled, "images_per_second") / mean(joint, "images_per_second")
    memory = mean(joint, "increase_mib") / max(mean(lightly, "increase_mib"), 1e-9)
    verdict = "faster" if speed >= 1 else "slower"
    trainer_seconds = {
        label: mean(label, "seconds_per_epoch") - data_seconds for label in (lightly, joint)
    }
    step = {label: mean(label, "median_step_seconds") for label in (lightly, joint)}
    # Python and trainer overhead: the part of a profiled step in no operator.
    overhead = {
        label: 1 - results[label][0]["operator_seconds_per_step"] / step[label]
        for label in (lightly, joint)
    }
    return [
        f"- **Speed.** protogmm's joint run trains {speed:.2f}x the images per second of "
        f"lightly's loop with the same recipe ({verdict}); the decoupled run "
        f"{decoupled_speed:.2f}x the joint one. Not the same work per step: lightly's loop "
        "(as its example and benchmark) runs the backbone once per view, 6 calls per step, "
        "while protogmm concatenates the views of one size (DINO's multi-crop wrapper), 3 "
        "calls with BatchNorm over 2B images; protogmm's trainer also runs Lightning "
        "(per-step logging of loss, schedules and target statistics to metrics.csv).",
        f"- **Data loading vs training.** The loader alone (the same crops of the same "
        f"images for every run, measured once after the runs) takes {data_seconds:.1f} s "
        f"per epoch; the rest of an epoch, the trainer's own work, is "
        f"{trainer_seconds[lightly]:.1f} s for lightly's loop and "
        f"{trainer_seconds[joint]:.1f} s for protogmm's joint run "
        f"({trainer_seconds[joint] / max(trainer_seconds[lightly], 1e-9):.2f}x).",
        f"- **Per step** (median, so neither the first steps nor the epoch ends count): "
        f"lightly {step[lightly]:.3f} s, protogmm joint {step[joint]:.3f} s "
        f"({step[joint] / step[lightly]:.2f}x)."
        + (
            " In the profiled steps the time spent outside any operator and the data "
            f"loader (Python, the trainer's bookkeeping) is {100 * overhead[lightly]:.0f} % of "
            f"lightly's step and {100 * overhead[joint]:.0f} % of protogmm's; the operators "
            "that take the rest are listed below."
            if all(math.isfinite(value) for value in overhead.values())
            else ""
        ),
        f"- **Memory.** protogmm joint / lightly: {memory:.2f}x the peak the run adds to its "
        "process (protogmm's includes Lightning's trainer, logger and checkpointing).",
    ]


DIFFERENCES = """\
What differs between the lightly runs and protogmm's, and why it stays:
- *Forward per view* (lightly's example and benchmarks): each view goes through the \
networks alone, so BatchNorm normalises over one view of B images; protogmm (DINO's \
multi-crop wrapper) runs the views of one size together (BatchNorm over 2B images).
- *Teacher EMA*: lightly's `cosine_schedule` (0.996 -> 1, reaching 1 at the last step) \
applied at the start of each step (lightly's order); protogmm's cosine ramp applied after \
each optimizer step. Same start value and shape.
- *Projection head*: lightly's Linear layers before BatchNorm have no bias; protogmm's have \
one. Same sizes, init (truncated normal, std 0.02), GELU and weight-normalised last layer \
with its gain fixed to 1.
- *Trainer*: protogmm runs under Lightning with its callbacks (k-NN monitor with baselines \
before the first step, checkpoints and collapse measurement at epoch ends: all outside the \
epoch timer); the lightly runs are a plain loop (lightly's own benchmarks use \
PyTorch Lightning too).
- *lightly's CIFAR-10 recipe* keeps K, head, optimizer, learning-rate schedule, EMA \
momentum and no last-layer freeze from `cifar10_benchmark.py`; it changes the backbone \
(ResNet-18 there), crops (2 x 32 px, no local crops there), data (CIFAR-10) and epochs \
(200 there). lightly reports the maximum k-NN accuracy over epochs; here every run reports \
the accuracy at the end."""


def section(
    args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], data_seconds: float
) -> str:
    data = args.data
    return "\n\n".join(
        [
            "## Side by side with lightly (DINO, MNIST-5k)",
            f"Command: `{command_line()}`  \nMachine: {machine_line()}; lightly "
            f"{args.lightly_version} (the `benchmarks` extra)",
            f"Budget: {args.epochs} epochs, batch {data['batch_size']}, 2 global + "
            f"{data['num_local_crops']} local crops, ConvNet, same data module and seed; "
            f"seeds {args.seeds}, every run in a fresh process, runs alternating. images/s: "
            "training images per second over the epochs (data loading included, evaluation "
            "excluded). Peak MiB: the most memory the run added to its process above what "
            "it held after its imports (resident set on CPU, CUDA allocator on GPU). k-NN "
            "on the teacher backbone at the end; unique % of the teacher's prototypes. Mean "
            "± std over seeds.",
            results_table(results),
            *findings(results, data_seconds),
            *(
                [
                    f"### Where a training step goes (torch.profiler, seed {args.seeds[0]}, "
                    f"{args.profile_steps} step(s) after {args.profile_skip + 1})",
                    "Self time of the operators (and of the data loader's `__next__`, where "
                    "the crops are made) in the profiled steps, per step; the share of the "
                    "step below 100 % is Python and trainer time outside them.",
                    profile_table(results),
                ]
                if args.profile_steps
                else []
            ),
            DIFFERENCES,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/lightly"))
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads per run (0: torch's default)"
    )
    parser.add_argument(
        "--profile-steps", type=int, default=3, help="steps profiled per run (0: none)"
    )
    parser.add_argument(
        "--profile-skip", type=int, default=5, help="steps before the profiled window"
    )
    parser.add_argument("--profile-top", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 epoch on 256 images, 1 thread")
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child), args.result)

    args.data = dict(DATA)
    if args.quick:
        args.epochs, args.seeds = 1, args.seeds[:1]
        args.data["max_train_samples"] = 256
        args.profile_steps, args.profile_skip = 1, 0  # 2 steps per run: warm-up, profiled
        # A smoke run: one thread keeps it fast on a shared machine.
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)  # so that machine_line() says what the runs use
    try:
        args.lightly_version = check_lightly()
    except LightlyUnavailable as error:
        print(f"lightly_side_by_side: {error}", file=sys.stderr)
        return LIGHTLY_UNAVAILABLE

    results: dict[str, list[dict[str, Any]]] = {label: [] for label in RUNS}
    labels = list(RUNS)
    for index, seed in enumerate(args.seeds):
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            spec = {
                **RUNS[label],
                "label": label,
                "seed": seed,
                "epochs": args.epochs,
                "data": args.data,
                "threads": args.threads,
                "profile_steps": args.profile_steps,
                "profile_skip": args.profile_skip,
                "profile_top": args.profile_top,
                "run_dir": str(args.out / f"{label.replace(' ', '_')}-seed{seed}"),
            }
            if args.quick and "overrides" in spec:
                spec["overrides"] = quick_model(spec["overrides"])
            print(f"=== {label}, seed {seed}", flush=True)
            try:
                results[label].append(run_child(spec))
            except RuntimeError as error:
                print(f"lightly_side_by_side: {error}", file=sys.stderr)
                return 1
            last = results[label][-1]
            print(
                f"    {last['images_per_second']:.0f} images/s, k-NN {100 * last['knn_k20']:.1f}, "
                f"peak +{last['increase_mib']:.0f} MiB, {last['wall_seconds']:.0f} s",
                flush=True,
            )
    print("=== data loading alone, one epoch", flush=True)
    data_seconds = data_seconds_per_epoch(args.data, args.seeds[0])
    text = section(args, results, data_seconds)
    print(text)
    if not args.no_write and not args.quick:
        replace_section("lightly", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
