"""Settings every test shares."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

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


@pytest.fixture
def benchmark_script() -> Callable[[str], ModuleType]:
    """Import a module of ``benchmarks/`` by name (a script folder, not a package)."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")

    def load(name: str) -> ModuleType:
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load
