"""The README's code snippets run as written (with tiny stand-in networks)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_swap_dino_last_layer_snippet_runs() -> None:
    batch, views = 4, 4

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.linear(x), dim=1)

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(16, 256)

    namespace = {
        "B": batch,
        "n_views": views,
        "teacher_temp": 0.04,
        "teacher_backbone": torch.nn.Identity(),
        "student_backbone": torch.nn.Identity(),
        "teacher_head": Head(),
        "student_head": Head(),
        "global_views": torch.randn(2 * batch, 16),
        "all_views": torch.randn(views * batch, 16),
    }
    exec(snippet_after("## Swap DINO's last layer"), namespace)  # noqa: S102 (our own README)
    loss = namespace["loss"]
    loss.backward()
    assert torch.isfinite(loss) and namespace["gmm"].step == 1
    assert namespace["student_head"].linear.weight.grad is not None


def test_measure_collapse_snippet_runs() -> None:
    namespace = {"prototypes": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    code = snippet_after("## Measure collapse of any prototype set")
    exec(
        code.replace(
            "unique_prototype_curve(prototypes", "result = unique_prototype_curve(prototypes"
        ),
        namespace,
    )  # noqa: S102
    assert namespace["result"][0.025] == 64
