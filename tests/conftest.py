"""Settings and fixtures every test shares (plain helpers: ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread() -> Iterator[None]:
    """The suite's models are tiny: one intra-op thread per process.

    On a 2-core machine two threads spin-wait for each other on tiny ops (a tiny fit took
    44 s with two threads and 3.8 s with one while other jobs shared the cores), and
    multi-process tests would oversubscribe the cores further.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_run(kind)``: the folder ``<tmp>/<kind>`` (``protogmm compare`` labels a run by
    its folder's name) of one finished tiny run with ``kind`` prototypes: the tiny model, one
    epoch on 64 synthetic 16 px images without local crops. Trained on first use and shared
    by every test of the session: read it, never modify it."""
    # Imported here: Lightning costs seconds that the tests without a run need not pay.
    from helpers import TINY_MODEL, fit_tiny, tiny_data

    runs: dict[str, Path] = {}

    def run(kind: str) -> Path:
        if kind not in runs:
            run_dir = tmp_path_factory.mktemp("tiny-run") / kind
            fit_tiny(run_dir, TINY_MODEL | {"prototypes": kind}, tiny_data(num_local_crops=0))
            runs[kind] = run_dir
        return runs[kind]

    return run
