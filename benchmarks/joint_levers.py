"""When do jointly learned prototypes collapse? The joint baseline's levers on a toy (issue 16).

    scripts/dev python -m benchmarks.joint_levers               # the BENCHMARKS.md section
    scripts/dev python -m benchmarks.joint_levers --quick       # smoke run (~1 minute)

DINO with the project's own bricks (``DINOLoss``, ``LearnedPrototypes``, ``OnlineGMM``) on a
toy in seconds per hundred steps: 50 Gaussian clusters in 64 dimensions, two noisy views of
one draw per image, a 3-layer MLP head (no BatchNorm, as DINO's head) onto the unit sphere
in d = 128, an EMA teacher, K = 4096 prototypes, AdamW with DINO's schedules (warm-up then
cosine lr, weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1). Each row changes one lever
of ``PrototypicalSSL`` (the same names): ``prototype_init_scale`` (the last layer's initial
``||v||``), ``prototype_lr_multiplier`` and ``schedule_steps`` (schedules built for that
horizon, the run stopped earlier), and the decoupled row replaces the learned prototypes by
an ``OnlineGMM`` fitted to the teacher's embeddings. Reports unique prototypes (Definition
2.1, teacher's set) at eps = 0.025 and 0.1 over training, and k-NN (k = 20) of the teacher's
embeddings on the cluster labels.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protogmm.diagnostics import unique_prototype_curve
from protogmm.evaluation import knn_accuracy
from protogmm.objectives import DINOLoss
from protogmm.prototypes import LearnedPrototypes, OnlineGMM
from protogmm.schedules import cosine_ramp, warmup_cosine

from ._common import command_line, machine_line, mean_std, replace_section

#: label -> levers (the PrototypicalSSL option names) and the prototype kind.
ROWS: dict[str, dict[str, Any]] = {
    "joint, DINO's defaults": {},
    "joint, prototype_init_scale 0.02": {"prototype_init_scale": 0.02},
    "joint, prototype_lr_multiplier 10": {"prototype_lr_multiplier": 10.0},
    "joint, schedule_steps 4x the run": {"schedule_factor": 4},
    "joint, init 0.02 + schedule 4x": {"prototype_init_scale": 0.02, "schedule_factor": 4},
    "joint, init 0.02 + lr x10 + schedule 4x": {
        "prototype_init_scale": 0.02,
        "prototype_lr_multiplier": 10.0,
        "schedule_factor": 4,
    },
    "decoupled (OnlineGMM defaults), schedule 4x": {"decoupled": True, "schedule_factor": 4},
}
CLUSTERS, INPUT_DIM, DIM = 50, 64, 128


def head() -> nn.Module:
    return nn.Sequential(
        nn.Linear(INPUT_DIM, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, DIM)
    )


def run(levers: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train one configuration; returns the unique % curves and the final k-NN."""
    torch.manual_seed(seed)
    centres = torch.randn(CLUSTERS, INPUT_DIM) * 2.0

    def draw(n: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        labels = torch.randint(0, CLUSTERS, (n,))
        base = centres[labels] + torch.randn(n, INPUT_DIM)
        return [base + 0.5 * torch.randn(n, INPUT_DIM) for _ in range(2)], labels

    student = nn.ModuleDict({"head": head()})
    gmm = OnlineGMM(args.k, DIM, seed=seed) if levers.get("decoupled") else None
    if gmm is None:
        student["prototypes"] = LearnedPrototypes(
            args.k, DIM, init_scale=levers.get("prototype_init_scale", 1.0)
        )
    teacher = copy.deepcopy(student).requires_grad_(False)
    objective = DINOLoss(args.k)
    groups = [{"params": list(student["head"].parameters()), "factor": 1.0}]
    if gmm is None:
        factor = levers.get("prototype_lr_multiplier", 1.0)
        groups.append({"params": list(student["prototypes"].parameters()), "factor": factor})
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    horizon = args.steps * levers.get("schedule_factor", 1)
    if gmm is not None:
        gmm.anneal_steps = round(0.1 * horizon)
    warmup = round(0.1 * args.steps)
    curves: dict[float, list[float]] = {0.025: [], 0.1: []}
    for step in range(args.steps):
        lr = warmup_cosine(step, horizon, warmup, args.lr, 1e-6)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["factor"]
            group["weight_decay"] = cosine_ramp(step, horizon, 0.04, 0.4)
        views, _ = draw(args.batch)
        x = torch.cat(views)
        with torch.no_grad():
            h = F.normalize(teacher["head"](x), dim=1)
            if gmm is not None:
                gmm.update(h)
                objective.reset_center(gmm.moved)
            scoring = gmm if gmm is not None else teacher["prototypes"]
            teacher_scores = scoring(h).view(2, args.batch, -1)
        student_scoring = gmm if gmm is not None else student["prototypes"]
        student_scores = student_scoring(student["head"](x)).view(2, args.batch, -1)
        loss = objective(student_scores, teacher_scores, teacher_temperature=0.04)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.update_center(teacher_scores)
        momentum = cosine_ramp(step, horizon, 0.996, 1.0)
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
                t.mul_(momentum).add_(s, alpha=1.0 - momentum)
        if step % args.every == 0 or step == args.steps - 1:
            vectors = gmm.prototypes() if gmm is not None else teacher["prototypes"].prototypes()
            counts = unique_prototype_curve(vectors.detach(), tuple(curves))
            for eps in curves:
                curves[eps].append(100.0 * counts[eps] / args.k)
    (train_views, train_labels), (test_views, test_labels) = draw(2000), draw(500)
    with torch.no_grad():
        train = F.normalize(teacher["head"](train_views[0]), dim=1)
        test = F.normalize(teacher["head"](test_views[0]), dim=1)
    knn = knn_accuracy(train, train_labels, test, test_labels, k=20)
    return {"curves": curves, "knn": float(knn)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=90, help="steps between collapse counts")
    parser.add_argument("--quick", action="store_true", help="60 steps, K = 256, 1 seed")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.k, args.seeds, args.every = 60, 256, [0], 20
        args.rows = [args.rows[0], list(ROWS)[-1]]
    lines = [
        "| levers | unique % ε=0.025 at 30 % / end of the run | unique % ε=0.1 at 30 % / end"
        " | k-NN (%) |",
        "|---|---|---|---|",
    ]
    for label in args.rows:
        results = [run(ROWS[label], args, seed) for seed in args.seeds]
        cells = []
        for eps in (0.025, 0.1):
            early = [r["curves"][eps][round(0.3 * (len(r["curves"][eps]) - 1))] for r in results]
            end = [r["curves"][eps][-1] for r in results]
            cells.append(f"{mean_std(early)} / {mean_std(end)}")
        cells.append(mean_std([r["knn"] for r in results], 100))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.no_write or args.quick:
        return
    body = f"""## The joint baseline's levers on a toy (issue 16)

`{command_line()}`; {machine_line()}. {args.steps} steps at batch {args.batch} (two views),
K = {args.k}, d = {DIM}, seeds {args.seeds} (mean ± std). The toy and the levers are in
the script's docstring; unique % is Definition 2.1 on the teacher's prototypes (the
mixture's for the decoupled row), k-NN on the 50 cluster labels.

{table}
"""
    replace_section("joint-levers", body)


if __name__ == "__main__":
    main()
