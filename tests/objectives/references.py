"""The losses' per-element references in plain Python, shared by the objective tests.

Imported as ``from references import ...`` (pytest puts this folder on ``sys.path``, as
``tests/data`` imports ``imagefiles``); kept apart from ``tests/helpers.py``, which imports
Lightning, so that these tests start in a fraction of the time.
"""

from __future__ import annotations

import math


def softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def log_softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_total for x in row]
