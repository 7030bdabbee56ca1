"""The paper's recipes on this CPU: ViT-S/16 at 224 px, each host, 1 and 2 gloo processes.

    scripts/dev python -m benchmarks.vit_cpu              # every configuration (~20 min)
    scripts/dev python -m benchmarks.vit_cpu --quick      # DINO only, 1 process

Each configuration is ``protogmm fit --config <recipe>`` (DINO and iBOT: ViT-S/16,
``dino|ibot_vits16_imagenet_decoupled.yaml``; CARP: ResNet-50, ``carp_resnet50_...``) on a
224-px class folder made here, cut to what a CPU runs: fp32, a batch of 2 per process with
2 local crops at 96 px, 2 steps, a k-NN bank of 20 + 10 images, the mixture initialised from
the first batch. One process runs with 2 threads, two (torchrun, gloo) with 1 each. Measured:
wall time, the run's own seconds per epoch (2 steps and the monitors), and the peak RSS of
the largest process (``/usr/bin/time``); the DINO run also on a folder ten times larger, to
show that memory does not grow with the data set. Writes the section "ViT-S/16 at 224 px on
this CPU" of BENCHMARKS.md (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ._common import command_line, machine_line, package_environment, replace_section

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "DINO": "dino_vits16_imagenet_decoupled.yaml",
    "iBOT": "ibot_vits16_imagenet_decoupled.yaml",
    "CARP": "carp_resnet50_imagenet_decoupled.yaml",
}
#: What makes a recipe fit this CPU (every other key is the recipe's).
CPU_OVERRIDES = [
    "--trainer.accelerator=cpu",
    "--trainer.num_nodes=1",
    "--trainer.precision=32-true",
    "--trainer.max_steps=2",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.sync_batchnorm=false",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--data.num_local_crops=2",
    "--data.knn.train_samples=20",
    "--data.knn.test_samples=10",
    "--model.prototypes.gmm.init_samples=0",
]


def make_folder(root: Path, images: int) -> Path:
    """224-px class folders (10 classes, smooth random JPEGs; held-out: a fifth, >= 10)."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(10, images // 5))):
        for index in range(count):
            label = index % 10
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
            small[..., label % 3] = 200
            image = Image.fromarray(small).resize((224, 224), Image.BILINEAR)
            image.save(folder / f"{index}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def run(host: str, processes: int, data: Path, run_dir: Path) -> dict[str, float]:
    """One fit; its wall time, seconds per epoch and the largest process's peak RSS."""
    shutil.rmtree(run_dir, ignore_errors=True)
    fit = [
        "fit",
        "--config",
        str(ROOT / "src" / "protogmm" / "configs" / RECIPES[host]),
        *CPU_OVERRIDES,
        f"--data.root={data}",
        f"--trainer.default_root_dir={run_dir}",
    ]
    if processes == 1:
        launcher = [sys.executable, "-m", "protogmm.cli", *fit, "--trainer.devices=1"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += [f"--nproc_per_node={processes}", "-m", "protogmm.cli", *fit]
        launcher += ["--trainer.devices=auto", "--trainer.strategy=ddp"]
    threads = str(max(1, 2 // processes))
    env = package_environment() | {"OMP_NUM_THREADS": threads}
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "maxrss %M", *launcher],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir.parent,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{host} x {processes}: {done.stderr[-1500:]}")
    rss_kb = int(re.findall(r"maxrss (\d+)", done.stderr)[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "wall": wall,
        "seconds_per_epoch": float(summary["seconds_per_epoch"]),
        "peak_rss_gb": rss_kb / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-vit-cpu"))
    parser.add_argument("--images", type=int, default=300, help="training images (x10 too)")
    parser.add_argument("--quick", action="store_true", help="DINO, one process, one size")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    small = make_folder(work / f"data-{args.images}", args.images)
    configs = [("DINO", 1, small)]
    if not args.quick:
        large = make_folder(work / f"data-{10 * args.images}", 10 * args.images)
        configs += [("DINO", 2, small), ("iBOT", 1, small), ("iBOT", 2, small)]
        configs += [("CARP", 1, small), ("CARP", 2, small), ("DINO", 1, large)]
    rows = []
    for host, processes, data in configs:
        images = int(data.name.split("-")[1])
        result = run(host, processes, data, work / f"{host}-{processes}p-{images}")
        print(host, processes, images, result, flush=True)
        rows.append(
            f"| {host} | {RECIPES[host].split('_')[1]} | {processes} | {images:,} | "
            f"{result['seconds_per_epoch'] / 2:.1f} | {result['wall']:.0f} | "
            f"{result['peak_rss_gb']:.2f} |"
        )
    section = "\n".join(
        [
            "## ViT-S/16 at 224 px on this CPU (issue 19, item 7)",
            "",
            f"Command: `{command_line()}` ({machine_line()}).",
            "Each row is `protogmm fit --config <host>_<backbone>_imagenet_decoupled.yaml` cut",
            "to this CPU (fp32, 2 images per process with 2 x 224 + 2 x 96 crops, 2 steps, a",
            "k-NN bank of 20 + 10 images, the mixture initialised from the first batch; K as",
            "the recipe: 65,536, iBOT 8,192); one process has 2 threads, two gloo processes 1",
            "each. Seconds per step: the run's seconds per epoch over its 2 steps (with the",
            "mixture's k-means initialisation and the epoch-end monitors); peak RSS: the",
            "largest process (`/usr/bin/time`).",
            "",
            "| host | backbone | processes | training images | s / step | wall s | peak RSS GB |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(section)
    if not args.no_write:
        replace_section("vit-cpu", section)


if __name__ == "__main__":
    main()
