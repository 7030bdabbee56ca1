"""The lightly side-by-side benchmark: --quick end to end, and lightly only an optional extra."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from pathlib import Path

import pytest

from benchmarks import lightly_side_by_side
from helpers import REPO_ROOT, benchmarks_section, run_benchmark

RUN_LABELS = (
    "lightly DINO, protogmm's recipe",
    "lightly DINO, its CIFAR-10 recipe",
    "protogmm DINO joint",
    "protogmm DINO decoupled",
)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("lightly") is None,
    reason="lightly is not installed: pip install 'protogmm[benchmarks]'",
)
def test_quick_mode_trains_every_run_and_prints_the_section(tmp_path: Path) -> None:
    before = benchmarks_section("lightly")
    out = run_benchmark(
        "lightly_side_by_side",
        *["--quick", "--no-write", "--out", str(tmp_path / "runs")],
        cwd=tmp_path,
        timeout=1800,
    )
    section = out[out.index("## Side by side with lightly") :]
    lines = section.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    rows = {}
    for line in lines[header_at + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells
    assert set(rows) == {*RUN_LABELS, "untrained encoder", "raw pixels"}
    for label in RUN_LABELS:
        row = dict(zip(header, rows[label], strict=True))
        for key in ("images/s", "s/epoch", "median s/step"):
            assert float(row[key]) > 0, row
        assert math.isfinite(float(row["peak MiB (run)"])), row
        for key in ("k-NN k=20", "k-NN k=200"):
            assert 0 < float(row[key]) <= 100, row
        unique = [
            float(v) for v in row[next(h for h in header if h.startswith("unique"))].split("/")
        ]
        assert len(unique) == 4 and all(0 < v <= 100 for v in unique), row
        assert math.isfinite(float(row["final loss"])), row
    assert rows["lightly DINO, its CIFAR-10 recipe"][1] == "2048"
    assert "- **Speed.**" in section
    profile = section[section.index("### Where a training step goes") :].splitlines()
    profile_rows = [line for line in profile if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in profile_rows[1:]] == list(RUN_LABELS)
    assert not [row for row in profile_rows if "not profiled" in row]
    # --quick never rewrites the measured numbers.
    assert benchmarks_section("lightly") == before


def missing(name: str) -> str:
    raise importlib.metadata.PackageNotFoundError(name)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (missing, "lightly is not installed; "),
        (lambda name: "1.5.0", "found lightly 1.5.0, the benchmark is written for 1.6.0; "),
    ],
)
def test_without_lightly_1_6_0_one_line_says_how_to_install_it_and_exit_3(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    version: object,
    message: str,
) -> None:
    monkeypatch.setattr(lightly_side_by_side.importlib.metadata, "version", version)
    code = lightly_side_by_side.main(["--quick", "--no-write"])
    assert code == lightly_side_by_side.LIGHTLY_UNAVAILABLE == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"lightly_side_by_side: {message}install it with: pip install 'protogmm[benchmarks]'"
    ]


def test_lightly_is_only_the_benchmarks_extra_pinned_to_the_version_the_script_uses() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def lightly(requirements: list[str]) -> list[str]:
        return [r for r in requirements if r.lower().replace("_", "-").startswith("lightly")]

    assert not lightly(project.get("dependencies", []))
    extras = project.get("optional-dependencies", {})
    assert {name: lightly(reqs) for name, reqs in extras.items() if lightly(reqs)} == {
        "benchmarks": [f"lightly=={lightly_side_by_side.LIGHTLY_VERSION}"]
    }
