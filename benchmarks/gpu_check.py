"""The paper's setting on one GPU: joint vs decoupled heads of DINO and iBOT ViT-S/16.

    scripts/dev python -m benchmarks.gpu_check                  # on a GPU (about 6 minutes)
    scripts/dev python -m benchmarks.gpu_check --tiny --device cpu --no-write   # smoke run

For DINO and then iBOT, each with joint and with decoupled prototypes, the model of the
recipe (``<host>_vits16_imagenet_<kind>.yaml``: ViT-S/16, K = 65,536 for DINO, 8,192 for
iBOT, 2 x 224 + 10 x 96 crops) trains on random images in bf16 autocast: the largest batch
per GPU of 32, 64, 128, 256 that fits, then images per second (the median of the timed
steps), the peak GPU memory, and the head's share of the step (one minus the time of the
same backbone passes with a trivial loss over the full step's). The mixture initialises from
the first batch. Writes the section "GPU" of BENCHMARKS.md with the card's name.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ._common import command_line, machine_line, replace_section

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (32, 64, 128, 256)
#: A CPU-sized stand-in for ``--tiny``: the same code path, a small ViT, 32 px, small K.
TINY = {
    "backbone": "vit",
    "backbone_kwargs": {"embed_dim": 48, "depth": 1, "num_heads": 3, "patch_size": 8},
    "num_prototypes": 512,
    "hidden_dim": 64,
}


def build(host: str, kind: str, tiny: bool, device: str) -> Any:
    """The recipe's module (or its tiny stand-in) on ``device``, with its optimizer."""
    from protogmm.training.module import PrototypicalSSL

    path = ROOT / "src" / "protogmm" / "configs" / f"{host}_vits16_imagenet_{kind}.yaml"
    model = yaml.safe_load(path.read_text())["model"]
    if kind == "decoupled":
        model["prototypes"]["init_args"]["gmm"] = {"init_samples": 0}
    if tiny:
        model |= TINY
    size = 32 if tiny else 224
    module = PrototypicalSSL(**model, in_channels=3, image_size=size).to(device)
    return module, module.configure_optimizers(), size


def views(batch: int, size: int, device: str) -> list[torch.Tensor]:
    """2 global views and 10 local ones (96/224 of the global size), random."""
    local = max(8, size * 96 // 224)
    return [torch.randn(batch, 3, size, size, device=device) for _ in range(2)] + [
        torch.randn(batch, 3, local, local, device=device) for _ in range(10)
    ]


def train_step(module: Any, optimizer: Any, batch: list[torch.Tensor], step: int) -> None:
    """One full step: the host's (eq. 2 and 3), backward, optimizer, teacher EMA."""
    from protogmm.models import update_ema_

    schedule = module.schedule_at(step, 1000, 100)
    with torch.autocast(batch[0].device.type, dtype=torch.bfloat16):
        loss = module.host.step(module.step_context(schedule), batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema_(module.teacher, module.student, schedule["teacher_momentum"])


def backbone_step(module: Any, optimizer: Any, batch: list[torch.Tensor], step: int) -> None:
    """The same backbone passes (teacher on the global views, student on all) and optimizer
    step with a trivial loss: the step without its head."""
    from protogmm.hosts.base import backbone_features

    with torch.autocast(batch[0].device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            backbone_features(module.teacher, batch[:2])
        loss = backbone_features(module.student, batch).float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(function: Any, module: Any, optimizer: Any, batch: list, steps: int) -> float:
    """Median seconds per step of ``function`` after two warm-up steps."""
    seconds = []
    for step in range(steps + 2):
        synchronize(batch[0].device)
        start = time.perf_counter()
        function(module, optimizer, batch, step)
        synchronize(batch[0].device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[2:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(host: str, kind: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The largest batch that fits, its images/s, peak memory and the head's share."""
    best = None
    for batch_size in args.batches:
        try:
            module, optimizer, size = build(host, kind, args.tiny, args.device)
            batch = views(batch_size, size, args.device)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = timed(train_step, module, optimizer, batch, args.steps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0
            backbone = timed(backbone_step, module, optimizer, batch, args.steps)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            module = optimizer = batch = None  # noqa: F841 (freed before the next size)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        best = {
            "batch": batch_size,
            "images_per_s": batch_size / step,
            "peak_gb": peak,
            "head_share": max(0.0, 1.0 - backbone / step),
            "step_s": step,
        }
        print(host, kind, best, flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small ViT at 32 px (CPU smoke)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --device cpu --tiny for a smoke run)")
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    rows = []
    for host in ("dino", "ibot"):
        for kind in ("joint", "decoupled"):
            result = measure(host, kind, args)
            if result is None:
                rows.append(f"| {host} | {kind} | nothing fits | | | | |")
                continue
            rows.append(
                f"| {host} | {kind} | {result['batch']} | {result['images_per_s']:.0f} | "
                f"{result['step_s']:.3f} | {result['peak_gb']:.1f} | "
                f"{100 * result['head_share']:.0f} % |"
            )
    section = "\n".join(
        [
            "## GPU",
            "",
            f"Command: `{command_line()}` ({machine_line()}; card: {card}).",
            "DINO and iBOT ViT-S/16 of the recipes, bf16 autocast, random 2 x 224 + 10 x 96",
            "views, the largest batch per GPU of the list that fits; images/s from the median",
            "step; head's share: 1 - (the same backbone passes with a trivial loss) / step.",
            "",
            "| host | prototypes | batch | images/s | s / step | peak GB | head's share |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(section)
    if not args.no_write:
        replace_section("gpu", section)


if __name__ == "__main__":
    main()
