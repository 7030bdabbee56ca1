"""Head cost vs K: the joint DINO head against the decoupled online-GMM head, per step.

    scripts/dev python -m benchmarks.head_cost                  # the BENCHMARKS.md section (CPU)
    scripts/dev python -m benchmarks.head_cost --device cuda    # the same table on a GPU
    scripts/dev python -m benchmarks.head_cost --quick          # smoke run (a minute or two)

For each K, with d = 256 and a batch of 256 images (2 global views: teacher embeddings
``[2B, d]``, student embeddings ``[(2 + L) B, d]`` that require grad), one training step of
the prototype head alone, everything after the encoder:

* **joint** (DINO): the EMA teacher's ``LearnedPrototypes`` score the teacher embeddings,
  ``DINOLoss.teacher_distribution`` centres and sharpens them (then ``update_center``), the
  student's ``LearnedPrototypes`` score the student embeddings, the DINO loss, backward (to
  the embeddings and the prototype weights), an AdamW step on the prototype weights and the
  teacher's EMA update;
* **decoupled**: ``OnlineGMM.update(h_teacher)`` (E-step, statistics, M-step), the mixture's
  prototypes score the teacher embeddings for the same DINO targets, the student embeddings
  are scored against the same (fixed) prototypes, the DINO loss, backward to the embeddings
  only (the mixture has no parameters, no optimizer, no EMA).

Both heads are timed in one process, configurations alternated over the repeats (median of
the repeats, warm-up excluded), beside the floor measured the same way: one ``[2B x d] @
[d x K]`` product and a forward + backward of ``z @ W^T`` (3 such products). Peak memory is
measured per configuration in a fresh child process (see :func:`peak_memory_of_head`).
Also timed: ``unique_prototypes(prototypes, 0.025)`` (Definition 2.1) on each head's
prototypes at each K, and a ``torch.profiler`` breakdown of both steps at the largest K.
Writes the "Head cost vs K" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from protogmm.reports import markdown_table

from ._common import (
    add_labels_argument,
    command_line,
    machine_line,
    replace_section,
)

# The heads and the measurements live in _head_cost_measures; every name stays importable
# from here (tests and notebooks use head_cost.Setting, head_cost.BREAK_EVEN_LOCAL_VIEWS).
from ._head_cost_measures import (  # noqa: F401 (re-exported)
    BREAK_EVEN_LOCAL_VIEWS,
    DENSE_DEFAULT,
    EPS,
    HEADS,
    LEARNING_RATE,
    PHASE_PREFIX,
    TEACHER_MOMENTUM,
    TEACHER_TEMPERATURE,
    VARIANTS,
    WEIGHT_DECAY,
    DecoupledHead,
    JointHead,
    Profile,
    Result,
    Setting,
    build_head,
    floor_calls,
    make_inputs,
    measure_memory,
    peak_memory_of_head,
    phase,
    profile_steps,
    seconds_per_call,
    state_mib,
    synchronize,
    time_setting,
    time_unique_count,
)


# ---------------------------------------------------------------------------- report
def mebibytes(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def cost_table(results: list[Result]) -> str:
    rows = []
    for result in results:
        s, t, m = result.setting, result.seconds, result.memory_mib
        floor = t["product"]
        rows.append(
            [
                f"{s.k}",
                f"{s.local_views}",
                f"{1e3 * t['joint']:.2f}",
                f"{1e3 * t['decoupled']:.2f}",
                f"**{t['decoupled'] / t['joint']:.2f}**",
                mebibytes(m["joint"]),
                mebibytes(m["decoupled"]),
                f"**{m['decoupled'] / m['joint']:.2f}**" if m["joint"] > 0 else "n/a",
                f"{1e3 * floor:.2f}",
                f"{1e3 * t['forward_backward']:.2f}",
                f"{t['joint'] / floor:.1f} ({s.products('joint'):g})",
                f"{t['decoupled'] / floor:.1f} ({s.products('decoupled'):g})",
            ]
        )
    header = [
        "K",
        "local views L",
        "joint ms/step",
        "decoupled ms/step",
        "time decoupled/joint",
        "joint peak MiB",
        "decoupled peak MiB",
        "memory decoupled/joint",
        "floor: 1 product ms",
        "floor: fwd+bwd (3 products) ms",
        "joint step in floors (products)",
        "decoupled step in floors (products)",
    ]
    return markdown_table(header, rows)


def variants_table(results: list[Result], variants: Sequence[str]) -> str:
    """Per K: each variant's ms/step and peak memory beside the default decoupled head's
    and the joint's."""
    rows = []
    for result in results:
        t, m = result.seconds, result.memory_mib
        for variant in variants:
            rows.append(
                [
                    f"{result.setting.k}",
                    f"{result.setting.local_views}",
                    variant,
                    describe_variant(variant),
                    f"{1e3 * t[variant]:.2f}",
                    f"{t[variant] / t['decoupled']:.2f}",
                    f"**{t[variant] / t['joint']:.2f}**",
                    mebibytes(m[variant]),
                    f"**{m[variant] / m['joint']:.2f}**" if m["joint"] > 0 else "n/a",
                ]
            )
    header = [
        "K",
        "local views L",
        "decoupled variant",
        "`OnlineGMM` arguments",
        "ms/step",
        "time variant / default decoupled",
        "time variant / joint",
        "peak MiB",
        "memory variant / joint",
    ]
    return markdown_table(header, rows)


def describe_variant(variant: str) -> str:
    return "`" + ", ".join(f"{k}={v!r}" for k, v in VARIANTS[variant].items()) + "`"


def unique_table(results: list[Result]) -> str:
    rows = []
    for result in results:
        if not result.in_sweep:
            continue  # the prototypes do not depend on L; one row per K
        joint_count, joint_s = result.unique["joint"]
        gmm_count, gmm_s = result.unique["decoupled"]
        rows.append(
            [
                f"{result.setting.k}",
                f"{joint_count}",
                f"{joint_s:.3f}",
                f"{joint_s / result.seconds['joint']:.1f}",
                f"{gmm_count}",
                f"{gmm_s:.3f}",
                f"{gmm_s / result.seconds['decoupled']:.1f}",
            ]
        )
    header = [
        "K",
        "joint (random init): unique",
        "seconds",
        "in joint steps",
        "decoupled (GMM): unique",
        "seconds",
        "in decoupled steps",
    ]
    return markdown_table(header, rows)


def profile_tables(profile: Profile) -> list[str]:
    """The per-phase table, then the top-operator table, both heads in each."""
    phase_rows = [
        [head, name, f"{ms:.2f}", f"{100 * share:.0f}"]
        for head, rows in profile.phases.items()
        for name, ms, share in rows
    ]
    operator_rows = [
        [head, f"`{name}`", f"{ms:.2f}", f"{100 * share:.0f}"]
        for head, rows in profile.operators.items()
        for name, ms, share in rows
    ]
    return [
        markdown_table(["head", "phase", "ms/step", "% of step"], phase_rows),
        markdown_table(["head", "operator", "self ms/step", "% of step"], operator_rows),
    ]


def findings(results: list[Result]) -> list[str]:
    """Plain sentences computed from the numbers: what the table shows, and why."""
    lines = []
    sweep = [r for r in results if r.in_sweep]
    largest = max(sweep, key=lambda r: r.setting.k)
    s, t = largest.setting, largest.seconds
    floor = t["product"]
    predicted = s.products("decoupled") / s.products("joint")
    measured = t["decoupled"] / t["joint"]
    cheaper = [r.setting.k for r in sweep if r.seconds["decoupled"] < r.seconds["joint"]]
    update = (
        "the E-step and the statistics are one product each with 2d columns"
        if DENSE_DEFAULT
        else "truncated EM, the default, picks each row's candidates from the teacher's "
        "scores and fits them on N x top_k"
    )
    lines.append(
        f"- **Time.** With L = {s.local_views} local views the decoupled step does "
        f"{s.products('decoupled'):g} "
        f"products of the floor's size against the joint step's {s.products('joint'):g} "
        f"({update}; the decoupled step has no gradient to prototype weights): a ratio of "
        f"{predicted:.2f} if products were all. Measured at K = {s.k}: {measured:.2f} "
        + (
            f"(decoupled cheaper at K = {', '.join(map(str, cheaper))})."
            if cheaper
            else "(the decoupled step is not cheaper at any K measured)."
        )
    )
    lines.append(
        f"- **How much of a step the products explain** (K = {s.k}): the products account "
        f"for {100 * s.products('joint') * floor / t['joint']:.0f} % of the joint step and "
        f"{100 * s.products('decoupled') * floor / t['decoupled']:.0f} % of the decoupled "
        "step; the rest is element-wise work over N x K scores (softmaxes, the loss) and "
        "K x d state (normalising the prototypes, AdamW and EMA for joint; the mixture's "
        "weights, forgetting and M-step for decoupled): see the profile."
    )
    for result in results:
        if result.in_sweep:
            continue
        es, et = result.setting, result.seconds
        lines.append(
            f"- **With L = {es.local_views} local views** (K = {es.k}) the student scores "
            f"{es.student_views} views: {es.products('joint'):g} products for joint (3 per "
            f"student view block: scores, gradient to the embeddings and to the weights) "
            f"against {es.products('decoupled'):g} for decoupled (2 per block, plus the "
            f"teacher's scores{' and the E-step and statistics' if DENSE_DEFAULT else ''}); "
            f"measured ratio {et['decoupled'] / et['joint']:.2f}, predicted "
            f"{es.products('decoupled') / es.products('joint'):.2f}."
            + (
                f" By the product count the heads break even at L = {BREAK_EVEN_LOCAL_VIEWS} "
                "local views (1 + 3r = 5 + 2r at r = N_s / N_t = 4) and the decoupled head is "
                "cheaper beyond."
                if DENSE_DEFAULT
                else ""
            )
        )
    memory_ratio = largest.memory_mib["decoupled"] / max(largest.memory_mib["joint"], 1e-9)
    lines.append(
        f"- **Memory** (K = {s.k}): decoupled/joint {memory_ratio:.2f}. Persistent state: "
        f"joint {mebibytes(state_mib(s, 'joint'))} MiB (5 K x d: student and teacher "
        "weights, gradient, 2 AdamW moments), decoupled "
        f"{mebibytes(state_mib(s, 'decoupled'))} MiB (5 K x d: means, variances, S, S', Q); "
        "the rest of each peak is the step's temporaries (N x K scores and probabilities, and "
        "K x d copies)."
    )
    return lines


def section(
    args: argparse.Namespace,
    results: list[Result],
    profile: Profile | None,
) -> str:
    first = results[0].setting
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    memory_how = (
        "CUDA `max_memory_allocated` above the allocated inputs"
        if args.device.startswith("cuda")
        else "resident-set high-water mark above the resident set after building the inputs "
        "(VmHWM reset through /proc/self/clear_refs)"
    )
    parts = [
        "## Head cost vs K (joint DINO head vs decoupled online GMM, one step)",
        f"Command: `{command_line()}`  \nMachine: {machine_line()}; measured on: {device}",
        f"Setup: d = {first.dim}, batch {first.batch} images: teacher embeddings "
        f"[{first.teacher_rows}, {first.dim}] (2 global views), student embeddings "
        f"[(2 + L) x {first.batch}, {first.dim}] that require grad; float32. A step is "
        "everything after the encoder: joint = EMA teacher's `LearnedPrototypes` scores -> "
        "`DINOLoss.teacher_distribution` + `update_center` -> student's `LearnedPrototypes` "
        "scores -> DINO loss -> backward (embeddings and prototype weights) -> AdamW step -> "
        "EMA update; decoupled = `OnlineGMM.update(h_teacher)` (truncated EM by default: "
        "the teacher's scores it computes give the same DINO targets) -> the student's DINO "
        "loss against the fixed prototypes and its gradient to the embeddings in one blocked "
        "pass (`DINOLoss.against_fixed_prototypes`, as the DINO and iBOT hosts). "
        f"Time: best of {args.repeats} repeats of {args.steps} steps, "
        f"{args.warmup} warm-up steps excluded, both heads and the floor alternated in one "
        f"process. Peak memory: each head in a fresh spawned process, {memory_how}, over "
        f"building the head and {args.memory_steps} steps. Floor: one "
        f"[{first.teacher_rows} x {first.dim}] @ [{first.dim} x K] product, and the forward "
        "+ backward of `z @ W^T` (3 such products). 'In floors' = step time / one product; "
        "in brackets the step's product count in those units.",
        cost_table(results),
        *findings(results),
        "### Definition 2.1 count at each K",
        f"`unique_prototypes(prototypes, {EPS})` once per head after the timed steps: the "
        "joint teacher's prototypes (near their random init: all unique, the cover's worst "
        "case) and the mixture's means (initialised from the teacher's embeddings, so "
        "near-duplicates when K > N_t); 'in steps' = its time in units of that head's step.",
        unique_table(results),
    ]
    if args.variants:
        parts += [
            "### Other settings of the decoupled head",
            "Timed in the same process and alternation as the table above (same inputs, "
            "same steps); peak memory as above, each in its own child. `top_k = k`: "
            "truncated EM, each row's E-step and statistics on its k components of highest "
            "cosine (the teacher's scores, which the update computes once and hands to the "
            "targets, refreshed only where components moved). Isotropic: one variance per "
            "component (E-step and statistics d wide: 3 + 2r products against 5 + 2r). "
            "Re-seeding at every step (`reseed_min_share = 1`): the split "
            "and merge path (top-2 candidates per row, overlaps, splits) with about half "
            "of the components stranded, an upper bound on what it costs in a step where "
            "some component is stranded.",
            variants_table(results, args.variants),
        ]
    if profile is not None:
        kind = "CUDA" if args.device.startswith("cuda") else "CPU"
        parts += [
            f"### Where a step's time goes (K = {args.profile_k}, L = {args.local_views}, "
            f"torch.profiler over {args.profile_steps} steps, {kind} time)",
            "Phases of the step (inclusive time), then the top "
            f"{args.profile_top} operators by self time (share of all operators' self time).",
            *profile_tables(profile),
        ]
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``--quick``'s smaller sizes filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ks", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="images (B); 2B teacher rows")
    parser.add_argument(
        "--local-views", type=int, default=0, help="L local views in every row of the sweep"
    )
    parser.add_argument(
        "--extra-local-views",
        type=int,
        nargs="*",
        default=[8],
        help="one more row at the largest K per value (DINO uses 8 local crops)",
    )
    add_labels_argument(
        parser, "--variants", list(VARIANTS), "other decoupled settings timed beside the default"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-top", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--quick", action="store_true", help="K 256/1024, d 64, batch 32, 1 thread")
    parser.add_argument(
        "--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.dim, args.batch, args.extra_local_views = [256, 1024], 64, 32, [2]
        args.repeats, args.steps, args.warmup, args.memory_steps = 2, 2, 1, 2
        args.profile_steps, args.profile_top = 2, 5
        # A smoke run: one thread keeps it fast on a shared machine, where threads waiting
        # for each other's busy cores stretch millisecond steps to a second.
        args.threads = args.threads or 1
    return args


def measure(args: argparse.Namespace) -> tuple[list[Result], Profile | None]:
    """Time, count, profile and measure the memory of every setting the command line asks.

    Also sets ``args.profile_k`` (the largest K, profiled), which the section names.
    """
    # (setting, in the K sweep): the sweep, then the extra local-view rows at the largest K.
    largest = max(args.ks)
    settings = [
        (Setting(k, args.dim, args.batch, args.local_views, args.device), True) for k in args.ks
    ]
    settings += [
        (Setting(largest, args.dim, args.batch, views, args.device), False)
        for views in args.extra_local_views
        if views != args.local_views
    ]
    args.profile_k = largest
    results: list[Result] = []
    profile: Profile | None = None
    for setting, in_sweep in settings:
        print(f"=== K = {setting.k}, L = {setting.local_views}: timing", flush=True)
        seconds, heads, inputs = time_setting(
            setting,
            warmup=args.warmup,
            repeats=args.repeats,
            steps=args.steps,
            variants=args.variants,
        )
        unique = {name: time_unique_count(heads[name].prototypes()) for name in HEADS}
        if in_sweep and setting.k == largest:
            print(f"=== K = {setting.k}: profiling", flush=True)
            profile = profile_steps(
                heads, inputs, args.device, args.profile_steps, args.profile_top
            )
        del heads, inputs  # free this K's state before the next one
        print(f"=== K = {setting.k}, L = {setting.local_views}: memory", flush=True)
        memory = measure_memory(setting, args.memory_steps, args.variants)
        results.append(Result(setting, seconds, memory, unique, in_sweep))
        print(
            f"    joint {1e3 * seconds['joint']:.2f} ms, decoupled "
            f"{1e3 * seconds['decoupled']:.2f} ms, product {1e3 * seconds['product']:.3f} ms; "
            f"peak MiB {memory['joint']:.1f} / {memory['decoupled']:.1f}",
            flush=True,
        )
    return results, profile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("head_cost: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    results, profile = measure(args)
    text = section(args, results, profile)
    print(text)
    bad = [
        value
        for result in results
        for value in (*result.seconds.values(), *result.memory_mib.values())
        if not math.isfinite(value)
    ]
    if bad:
        print("head_cost: non-finite measurement", file=sys.stderr)
        return 1
    if not args.no_write and not args.quick:
        replace_section("head-cost", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
