"""The ``--child`` process of :mod:`benchmarks.lightly_side_by_side`: one run, measured.

:func:`child_main` runs one configuration (:mod:`benchmarks._lightly_runs`) in a fresh
process, inside a peak-memory window and under :class:`StepClock`, which times every
optimizer step of either trainer and profiles a few; the measurements go to a JSON file
the parent reads. :mod:`benchmarks.lightly_side_by_side` re-exports every name here.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ._common import PeakMemory
from ._lightly_runs import LIGHTLY_MODULES, train_lightly, train_protogmm


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
