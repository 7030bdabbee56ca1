"""Settings every test shares."""

from __future__ import annotations

from collections.abc import Iterator

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
