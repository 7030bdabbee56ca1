"""The decoupling benchmark's --quick mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import _common as common
from helpers import REPO_ROOT, run_benchmark
from protogmm.prototypes import OnlineGMM


@pytest.mark.slow
def test_quick_mode_trains_every_main_config_and_prints_the_section(tmp_path: Path) -> None:
    before = (REPO_ROOT / "BENCHMARKS.md").read_text()
    out = run_benchmark(
        "decoupling",
        *["--quick", "--batch-size", "64", "--out", str(tmp_path / "runs")],
        *["--plot", str(tmp_path / "collapse.png")],
        cwd=tmp_path,
        timeout=900,
    )
    section = out[out.index("## Decoupling at small scale") :]
    for label in ("| joint |", "| decoupled |", "| untrained encoder |", "| raw pixels |"):
        assert label in section
    assert "| posterior targets |" in section  # the --quick ablation
    assert "at batch 64, K = 1024" in section and "batch 64, 2 global" in section
    assert (tmp_path / "collapse.png").stat().st_size > 0
    assert (tmp_path / "runs" / "joint-seed0" / "summary.json").exists()
    # --quick never rewrites the measured numbers.
    assert (REPO_ROOT / "BENCHMARKS.md").read_text() == before


def test_replace_section_replaces_only_its_own_block(tmp_path: Path) -> None:
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\nintro\n")
    common.replace_section("a", "first A", path)
    common.replace_section("b", "only B", path)
    common.replace_section("a", "second A", path)
    text = path.read_text()
    assert text == (
        "# Benchmarks\n\nintro\n\n<!-- BEGIN a -->\nsecond A\n<!-- END a -->\n\n"
        "<!-- BEGIN b -->\nonly B\n<!-- END b -->\n"
    )


def test_reusable_run_accepts_only_a_run_made_with_the_same_settings(tmp_path: Path) -> None:
    run = tmp_path / "decoupled-seed0"
    run.mkdir()
    (run / "summary.json").write_text('{"epochs": 16, "knn/top1": 0.9}')
    (run / "metrics.csv").write_text("step,loss\n0,6.5\n")
    # As Lightning writes it: tuples carry a Python tag that yaml.safe_load refuses.
    (run / "hparams.yaml").write_text(
        "prototypes: decoupled\nnum_prototypes: 4096\ngmm:\n  merge_overlap: 0.3\n"
        "batch_size: 32\nglobal_scale: !!python/tuple\n- 0.4\n- 1.0\n"
    )
    model = {"prototypes": "decoupled", "num_prototypes": 4096, "gmm": {"merge_overlap": 0.3}}
    data = {"batch_size": 32, "global_scale": (0.4, 1.0)}

    found = common.reusable_run(run, epochs=16, model=model, data=data)
    assert (
        found is not None
        and found["knn/top1"] == 0.9
        and found["rows"] == [{"step": 0.0, "loss": 6.5}]
    )
    # Another budget, another override, another data key, or an unfinished run: retrain.
    assert common.reusable_run(run, epochs=5, model=model, data=data) is None
    assert common.reusable_run(run, epochs=16, model={**model, "gmm": None}, data=data) is None
    assert common.reusable_run(run, epochs=16, model=model, data={"batch_size": 128}) is None
    assert common.reusable_run(tmp_path / "missing", epochs=16, model=model, data=data) is None


def decoupled_run(tmp_path: Path, summary: dict[str, object], gmm: str) -> Path:
    """A finished decoupled run folder: ``summary.json``, ``hparams.yaml`` (``gmm: <gmm>``)."""
    run = tmp_path / "decoupled-seed0"
    run.mkdir()
    (run / "metrics.csv").write_text("step\n0\n")
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "hparams.yaml").write_text(f"prototypes: decoupled\ngmm: {gmm}\n")
    return run


def test_reusable_run_retrains_a_decoupled_run_made_under_another_default(tmp_path: Path) -> None:
    # Recorded as the mixture resolved it: a run from before split and merge were the default.
    old_default = OnlineGMM(
        4, 3, merge_overlap=None, reseed_min_share=None, anneal_steps=155
    ).settings()
    summary = {"epochs": 5, "prototypes": "decoupled", "gmm": old_default}
    run = decoupled_run(tmp_path, summary, gmm="null")
    data: dict[str, object] = {}

    # hparams.yaml alone cannot tell (gmm: null either way); the recorded settings can.
    assert common.reusable_run(run, epochs=5, model={"prototypes": "decoupled"}, data=data) is None
    plain = {"prototypes": "decoupled", "gmm": {"merge_overlap": None, "reseed_min_share": None}}
    (run / "hparams.yaml").write_text(
        "prototypes: decoupled\ngmm:\n  merge_overlap: null\n  reseed_min_share: null\n"
    )
    assert common.reusable_run(run, epochs=5, model=plain, data=data) is not None
    # The budget-derived anneal_steps is not a setting to match.
    summary["gmm"]["anneal_steps"] = 2000
    (run / "summary.json").write_text(json.dumps(summary))
    assert common.reusable_run(run, epochs=5, model=plain, data=data) is not None


def test_reusable_run_retrains_a_decoupled_run_without_a_recorded_mixture(tmp_path: Path) -> None:
    # Runs from before summary.json recorded the mixture predate today's defaults.
    run = decoupled_run(tmp_path, {"epochs": 16, "prototypes": "decoupled"}, gmm="null")
    assert common.reusable_run(run, epochs=16, model={"prototypes": "decoupled"}, data={}) is None


@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_or_train_trains_unless_reuse_finds_a_run_with_the_required_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reuse: bool,
) -> None:
    trained: list[str] = []
    finished = {"with-key": {"epochs": 5, "longtail": {}}, "without-key": {"epochs": 5}}
    monkeypatch.setattr(common, "reusable_run", lambda run_dir, **_: finished.get(run_dir.name))

    def train_run(run_dir: Path, **settings: object) -> dict[str, object]:
        assert settings["dense_every_n_steps"] == 50 and settings["seed"] == 3
        trained.append(run_dir.name)
        return {"trained": True}

    monkeypatch.setattr(common, "train_run", train_run)
    for name in ("with-key", "without-key", "missing"):
        common.reuse_or_train(
            tmp_path / name,
            name=name,
            reuse=reuse,
            epochs=5,
            seed=3,
            model={},
            data={},
            dense_every_n_steps=50,
            required_key="longtail",
        )
    assert trained == (
        ["without-key", "missing"] if reuse else ["with-key", "without-key", "missing"]
    )


def test_reusable_run_reads_a_run_recorded_with_the_classes(tmp_path: Path) -> None:
    """A run of today (host and kind as class specs) matches the benchmarks' flat model."""
    run = tmp_path / "joint-koleo-seed0"
    run.mkdir()
    (run / "summary.json").write_text('{"epochs": 5, "prototypes": "joint"}')
    (run / "metrics.csv").write_text("step\n0\n")
    (run / "hparams.yaml").write_text(
        "host:\n  class_path: protogmm.hosts.DINO\n  init_args: {}\n"
        "prototypes:\n  class_path: protogmm.prototypes.Joint\n"
        "  init_args:\n    koleo_weight: 0.1\n"
    )
    model = {"prototypes": "joint", "koleo_weight": 0.1}
    assert common.reusable_run(run, epochs=5, model=model, data={}) is not None
    assert common.reusable_run(run, epochs=5, model={"prototypes": "joint"}, data={}) is None
    other_host = {**model, "host": "carp"}
    assert common.reusable_run(run, epochs=5, model=other_host, data={}) is None


def test_reusable_run_reads_an_option_added_since_the_run_at_its_default(tmp_path: Path) -> None:
    # A run recorded before an option existed (here ``center_momentum``) was made with the
    # behaviour of its default; a run asking for another value is still retrained.
    recorded = OnlineGMM(4, 3, anneal_steps=155).settings()
    del recorded["center_momentum"]
    summary = {"epochs": 5, "prototypes": "decoupled", "gmm": recorded}
    run = decoupled_run(tmp_path, summary, gmm="null")
    model = {"prototypes": "decoupled"}
    assert common.reusable_run(run, epochs=5, model=model, data={}) is not None
    centred = {"prototypes": "decoupled", "gmm": {"center_momentum": 0.9}}
    (run / "hparams.yaml").write_text("prototypes: decoupled\ngmm:\n  center_momentum: 0.9\n")
    assert common.reusable_run(run, epochs=5, model=centred, data={}) is None
