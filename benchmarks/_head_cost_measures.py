"""The measurements behind :mod:`benchmarks.head_cost`: the two heads, timing, profile, memory.

One step of each head (:class:`JointHead`, :class:`DecoupledHead`), the floor it is
measured against, the alternated timing (:func:`time_setting`), the ``torch.profiler``
breakdown (:func:`profile_steps`) and the peak memory of a head in a spawned child
(:func:`measure_memory`). The report (tables, findings, the BENCHMARKS.md section) and the
command line stay in :mod:`benchmarks.head_cost`, which re-exports every name here.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from protogmm.diagnostics import unique_prototypes
from protogmm.models import make_teacher, update_ema_
from protogmm.objectives import DINOLoss
from protogmm.prototypes import LearnedPrototypes, MixtureOptions, OnlineGMM

from ._common import PeakMemory

HEADS = ("joint", "decoupled")
#: Other settings of the decoupled head, timed beside it (``--variants``): label -> extra
#: ``OnlineGMM`` arguments. Re-seeding only costs when a component is stranded, which a
#: benchmark of a few steps rarely reaches; the worst case forces it at every step (every
#: component under its expected share counts as stranded, about half of them, so up to one
#: component per distinct best-explaining component of the batch moves per step).
VARIANTS: dict[str, dict[str, float | int | str]] = {
    "dense (top_k=None)": {"top_k": None},
    "top_k=8": {"top_k": 8},
    "top_k=32": {"top_k": 32},
    "top_k=128": {"top_k": 128},
    "isotropic": {"covariance": "isotropic"},
    "re-seed at every step (worst case)": {"reseed_min_share": 1.0},
}
#: Whether the mixture's default update is dense (``top_k`` None) or truncated EM.
DENSE_DEFAULT = MixtureOptions().top_k is None
#: Where the product counts of :meth:`Setting.products` meet with the dense update:
#: 1 + 3r = 5 + 2r at r = N_s / N_t = (2 + L) / 2 = 4, i.e. L = 6 local views (with
#: truncated EM, 1 + 2r: the decoupled step has fewer products at every L).
BREAK_EVEN_LOCAL_VIEWS = 6
EPS = 0.025
PHASE_PREFIX = "phase: "
#: DINO's defaults, as protogmm's trainer uses them (training/module.py).
TEACHER_TEMPERATURE = 0.04
TEACHER_MOMENTUM = 0.996
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.04


def phase(name: str) -> torch.profiler.record_function:
    """A named part of a step, for the profile's per-phase table (free when not profiling)."""
    return torch.profiler.record_function(PHASE_PREFIX + name)


@dataclass(frozen=True)
class Setting:
    """One measured configuration: K prototypes in d dimensions, B images, L local views."""

    k: int
    dim: int
    batch: int
    local_views: int
    device: str

    @property
    def teacher_rows(self) -> int:
        """N_t = 2B: the teacher embeds the two global views."""
        return 2 * self.batch

    @property
    def student_views(self) -> int:
        return 2 + self.local_views

    @property
    def student_rows(self) -> int:
        """N_s = (2 + L) B: the student embeds every view."""
        return self.student_views * self.batch

    def products(self, head: str) -> float:
        """The step's matrix products, in units of one ``N_t x d x K`` product.

        joint: teacher scores (1), student scores, their gradient to the embeddings and to
        the prototype weights (3 N_s / N_t). decoupled: teacher scores (1), student scores
        and their gradient to the embeddings (2 N_s / N_t), and with the dense update
        (``top_k`` None) the E-step and the statistics, each one product with ``2d``
        columns (+4); truncated EM (the default, ``top_k = 8``) picks each row's
        candidates from the teacher's scores and works on ``N x top_k`` only.
        """
        ratio = self.student_rows / self.teacher_rows
        if head == "joint":
            return 1 + 3 * ratio
        return (5 if DENSE_DEFAULT else 1) + 2 * ratio


def make_inputs(setting: Setting, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Unit teacher embeddings ``[N_t, d]`` and unit student embeddings ``[N_s, d]`` (a leaf
    that requires grad: the encoder's output, where backward stops)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = F.normalize(torch.randn(setting.teacher_rows, setting.dim, generator=generator))
    student = F.normalize(torch.randn(setting.student_rows, setting.dim, generator=generator))
    return teacher.to(setting.device), student.to(setting.device).requires_grad_(True)


class JointHead:
    """DINO's head: student prototypes learned by AdamW, an EMA copy in the teacher."""

    def __init__(self, setting: Setting, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.setting = setting
        self.student = LearnedPrototypes(setting.k, setting.dim).to(setting.device)
        self.teacher = make_teacher(self.student)
        self.loss = DINOLoss(setting.k).to(setting.device)
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )

    def step(self, teacher_embeddings: Tensor, student_embeddings: Tensor) -> None:
        k, views = self.setting.k, self.setting.student_views
        with phase("teacher scores + targets"), torch.no_grad():
            teacher_scores = self.teacher(teacher_embeddings).view(2, -1, k)
            targets = self.loss.teacher_distribution(teacher_scores, TEACHER_TEMPERATURE)
            self.loss.update_center(teacher_scores)
            del teacher_scores  # as in the host's step: only the targets live on
        with phase("student scores + loss"):
            student_scores = self.student(student_embeddings).view(views, -1, k)
            loss = self.loss(student_scores, teacher_probs=targets)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            student_embeddings.grad = None
            loss.backward()
        with phase("AdamW step"):
            self.optimizer.step()
        with phase("EMA update"):
            update_ema_(self.teacher, self.student, TEACHER_MOMENTUM)

    def prototypes(self) -> Tensor:
        return self.teacher.prototypes().detach()


class DecoupledHead:
    """The decoupled head: one online GMM, fitted to the teacher, scoring both networks.

    ``gmm_kwargs`` are extra :class:`OnlineGMM` arguments (a :data:`VARIANTS` entry).
    """

    def __init__(
        self,
        setting: Setting,
        seed: int = 0,
        gmm_kwargs: dict[str, float | int | str] | None = None,
    ) -> None:
        self.setting = setting
        self.gmm = OnlineGMM(setting.k, setting.dim, seed=seed, **(gmm_kwargs or {})).to(
            setting.device
        )
        # Initialised as it starts (random unit means, variance 1/d, unit counts), without
        # the k-means over K collected rows that its first K / N_t steps would run (hours on
        # a CPU at K = 65,536): the steps timed are those of a fitted mixture, not of one
        # still collecting its initial rows. Initialised, the mixture frees its buffer of
        # collected rows.
        self.gmm.initialized.fill_(True)
        self.gmm._release_init_buffer()
        self.loss = DINOLoss(setting.k).to(setting.device)

    def step(self, teacher_embeddings: Tensor, student_embeddings: Tensor) -> None:
        k = self.setting.k
        with phase("GMM update (E-step, statistics, M-step)"):
            # With top_k the update scores the teacher anyway and returns those scores
            # (refreshed where components moved), as PrototypeSets.fit hands them to DINO.
            fitted = self.gmm.update_and_score(teacher_embeddings, scores=False)
        with phase("teacher scores + targets"), torch.no_grad():
            teacher_scores = fitted.scores
            if teacher_scores is None:
                teacher_scores = self.gmm(teacher_embeddings)
            teacher_scores = teacher_scores.view(2, -1, k)
            targets = self.loss.teacher_distribution(teacher_scores, TEACHER_TEMPERATURE)
            self.loss.update_center(teacher_scores)
            del teacher_scores, fitted  # as in the host's step: only the targets live on
        with phase("student scores + loss"):
            # As the DINO host's step: the prototypes are constants, so the loss and its
            # gradient to the embeddings come from one blocked pass (no [N, K] kept).
            unit = self.gmm.unit_inputs(student_embeddings)
            loss = self.loss.against_fixed_prototypes(unit, self.gmm.prototypes(), targets)
        with phase("backward"):
            student_embeddings.grad = None
            loss.backward()

    def prototypes(self) -> Tensor:
        return self.gmm.prototypes()


def build_head(name: str, setting: Setting) -> JointHead | DecoupledHead:
    """``joint``, ``decoupled`` or a :data:`VARIANTS` label (a decoupled head)."""
    if name == "joint":
        return JointHead(setting)
    return DecoupledHead(setting, gmm_kwargs=VARIANTS.get(name))


# ---------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], object], calls: int, device: str) -> float:
    """Mean wall time of ``calls`` calls of ``fn`` (the device drained before and after)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def floor_calls(setting: Setting) -> dict[str, Callable[[], object]]:
    """The floor: one ``[2B x d] @ [d x K]`` product, and ``z @ W^T`` forward + backward."""
    generator = torch.Generator().manual_seed(1)
    left = torch.randn(setting.teacher_rows, setting.dim, generator=generator)
    right = torch.randn(setting.dim, setting.k, generator=generator)
    left, right = left.to(setting.device), right.to(setting.device)
    weight = right.T.contiguous().requires_grad_(True)
    embeddings = left.clone().requires_grad_(True)
    upstream = torch.ones(setting.teacher_rows, setting.k, device=setting.device)

    def forward_backward() -> None:
        weight.grad, embeddings.grad = None, None
        (embeddings @ weight.T).backward(upstream)

    return {"product": lambda: left @ right, "forward_backward": forward_backward}


def time_setting(
    setting: Setting,
    *,
    warmup: int,
    repeats: int,
    steps: int,
    variants: Sequence[str] = (),
) -> tuple[dict[str, float], dict[str, JointHead | DecoupledHead], tuple[Tensor, Tensor]]:
    """Best (least) seconds per step over the repeats of both heads, the ``variants`` and
    the floor, alternated.

    Each repeat times ``steps`` consecutive steps of every configuration, in an order that
    rotates from one repeat to the next, so that no configuration always runs first (or
    always right after the memory-hungry one). Warm-up steps (which include the mixture's
    k-means initialisation and AdamW's state allocation) are not timed.
    """
    teacher, student = make_inputs(setting)
    heads = {name: build_head(name, setting) for name in (*HEADS, *variants)}
    calls: dict[str, Callable[[], object]] = {
        name: (lambda head=head: head.step(teacher, student)) for name, head in heads.items()
    }
    floors = floor_calls(setting)
    calls.update(floors)
    # The floor is far cheaper than a step: time more calls of it per repeat.
    calls_per_repeat = {name: steps for name in heads} | {name: 4 * steps for name in floors}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(setting.device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(
                seconds_per_call(calls[name], calls_per_repeat[name], setting.device)
            )
    best = {name: min(values) for name, values in samples.items()}
    return best, heads, (teacher, student)


def time_unique_count(prototypes: Tensor) -> tuple[int, float]:
    """``unique_prototypes(prototypes, 0.025)`` and its wall time (one call: seconds long)."""
    start = time.perf_counter()
    count = unique_prototypes(prototypes, EPS)
    return count, time.perf_counter() - start


@dataclass
class Profile:
    """Per head: ``(name, milliseconds per step, share of the step)`` rows."""

    phases: dict[str, list[tuple[str, float, float]]]
    operators: dict[str, list[tuple[str, float, float]]]


def profile_steps(
    heads: dict[str, JointHead | DecoupledHead],
    inputs: tuple[Tensor, Tensor],
    device: str,
    steps: int,
    top: int,
) -> Profile:
    """``torch.profiler`` over ``steps`` steps of each head.

    Phases: the inclusive time of each :func:`phase` of the step. Operators: the ``top``
    operators by self time (time in the operator itself, not in what it calls), as a share
    of the summed self time of everything the step ran. Device time on CUDA (the host
    time of a phase where its device time is not recorded), CPU time otherwise.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def self_time(event: object) -> float:
        if cuda:
            return float(
                getattr(event, "self_device_time_total", None)
                or getattr(event, "self_cuda_time_total", 0.0)
            )
        return float(event.self_cpu_time_total)

    def inclusive_time(event: object) -> float:
        if cuda:
            device_time = getattr(event, "device_time_total", None) or getattr(
                event, "cuda_time_total", 0.0
            )
            if device_time:
                return float(device_time)
        return float(event.cpu_time_total)

    result = Profile({}, {})
    for name, head in heads.items():
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                head.step(*inputs)
            synchronize(device)
        events = profiler.key_averages()
        phases = [event for event in events if event.key.startswith(PHASE_PREFIX)]
        phase_total = sum(inclusive_time(event) for event in phases) or 1.0
        result.phases[name] = [
            (
                event.key[len(PHASE_PREFIX) :],
                inclusive_time(event) / 1e3 / steps,
                inclusive_time(event) / phase_total,
            )
            for event in phases
        ]
        operators = [event for event in events if not event.key.startswith(PHASE_PREFIX)]
        self_total = sum(self_time(event) for event in operators) or 1.0
        ranked = sorted(operators, key=self_time, reverse=True)[:top]
        result.operators[name] = [
            (event.key, self_time(event) / 1e3 / steps, self_time(event) / self_total)
            for event in ranked
        ]
    return result


# ---------------------------------------------------------------------------- memory
def peak_memory_of_head(name: str, setting: Setting, steps: int, threads: int) -> float:
    """Peak memory (MiB) of building ``name``'s head and running ``steps`` steps.

    Runs in a fresh (spawned) child, so nothing another configuration allocated or cached
    counts. The libraries are warmed up first (one step of a tiny head of each kind: what
    they load or allocate once per process, e.g. at AdamW's first step, is not the head's)
    and the inputs built; the peak is then measured over the head's construction
    (parameters, optimizer, buffers) and its steps, the mixture's k-means initialisation at
    its first step included: on CUDA ``torch.cuda.max_memory_allocated`` above what was
    allocated before, on CPU the resident-set high-water mark above the resident set
    before (``_common.PeakMemory``).
    """
    torch.set_num_threads(threads)
    tiny = Setting(8, setting.dim, 2, 0, setting.device)
    for kind in HEADS:
        build_head(kind, tiny).step(*make_inputs(tiny))
    teacher, student = make_inputs(setting)
    with PeakMemory(setting.device) as memory:
        head = build_head(name, setting)
        for _ in range(steps):
            head.step(teacher, student)
    return memory.increase_mib


def measure_memory(setting: Setting, steps: int, variants: Sequence[str] = ()) -> dict[str, float]:
    """:func:`peak_memory_of_head` of both heads (and ``variants``), each in its own
    spawned child."""
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for name in (*HEADS, *variants):
        with context.Pool(1, maxtasksperchild=1) as pool:
            peaks[name] = pool.apply(
                peak_memory_of_head, (name, setting, steps, torch.get_num_threads())
            )
    return peaks


# ---------------------------------------------------------------------------- results
@dataclass
class Result:
    """What one setting measured: median seconds, peak MiB and unique counts per head."""

    setting: Setting
    seconds: dict[str, float]
    memory_mib: dict[str, float]
    unique: dict[str, tuple[int, float]]
    #: True for the K sweep, False for the extra local-view rows at the largest K.
    in_sweep: bool


def state_mib(setting: Setting, head: str) -> float:
    """Persistent float32 state of a head, MiB: K x d matrices (and the DINO centre)."""
    kd = setting.k * setting.dim
    # joint: student and teacher weights, the gradient, AdamW's two moments;
    # decoupled: means, variances and the sufficient statistics S, S' and Q.
    matrices = 5
    return (matrices * kd + 6 * setting.k) * 4 / 2**20
