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
    command_line,
    machine_line,
    mean_std,
    package_environment,
    quick_model,
    replace_section,
)

# The child side lives in _lightly_runs (the runs) and _lightly_child (the measured child
# process); every name stays importable from here.
from ._lightly_child import StepClock, child_main  # noqa: F401 (re-exported)
from ._lightly_runs import (  # noqa: F401 (re-exported)
    CIFAR10_RECIPE,
    EPS,
    LIGHTLY_MODULES,
    lightly_networks,
    lightly_optimizer,
    protogmm_defaults,
    teacher_knn,
    train_lightly,
    train_protogmm,
)

#: The lightly the benchmark is written for: pyproject's ``benchmarks`` extra pins it.
LIGHTLY_VERSION = "1.6.0"
#: Ends the one line printed where lightly is missing or another version.
INSTALL_HINT = "install it with: pip install 'protogmm[benchmarks]'"
#: Exit status when lightly is missing or another version.
LIGHTLY_UNAVAILABLE = 3
DATA: dict[str, Any] = {"dataset": "mnist5k", "batch_size": 128, "num_local_crops": 2}

#: label -> what runs it ("lightly" with a recipe, or "protogmm" with PrototypicalSSL
#: overrides).
RUNS: dict[str, dict[str, Any]] = {
    "lightly DINO, protogmm's recipe": {"kind": "lightly", "recipe": "protogmm"},
    "lightly DINO, its CIFAR-10 recipe": {"kind": "lightly", "recipe": "cifar10"},
    "protogmm DINO joint": {"kind": "protogmm", "overrides": {"prototypes": "joint"}},
    "protogmm DINO decoupled": {"kind": "protogmm", "overrides": {"prototypes": "decoupled"}},
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
