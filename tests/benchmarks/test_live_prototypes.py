"""benchmarks.live_prototypes on tiny runs: live prototypes and the data's reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import live_prototypes
from protogmm.diagnostics import data_reference_curve, unique_prototype_curve
from protogmm.evaluation.features import extract_features
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import datamodule_from_checkpoint


@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_measure_counts_live_prototypes_against_the_references(
    tiny_run: Callable[[str], Path], kind: str
) -> None:
    run = tiny_run(kind)
    measured = live_prototypes.measure(run)
    # Reference computation: the teacher's training-split embeddings, their argmax choices.
    checkpoint = run / "checkpoints" / "last.ckpt"
    module = load_module(checkpoint)
    train_loader, _ = datamodule_from_checkpoint(checkpoint).knn_dataloaders()
    teacher = nn.Sequential(module.teacher["backbone"], module.teacher["head"])
    embeddings, _ = extract_features(teacher, train_loader, batch_statistics=True)
    prototypes = module.teacher_prototype_set().prototypes().detach()
    unit = torch.nn.functional.normalize(prototypes, dim=1)
    live = (embeddings @ unit.T).argmax(dim=1).unique()
    k = prototypes.shape[0]
    eps = live_prototypes.EPS
    assert measured["K"] == k and measured["images"] == embeddings.shape[0]
    assert measured["live"] == live.numel()
    all_curve = unique_prototype_curve(prototypes, eps)
    assert measured["all"] == [100.0 * all_curve[e] / k for e in eps]
    live_curve = unique_prototype_curve(prototypes[live], eps)
    assert measured["live unique"] == [100.0 * live_curve[e] / live.numel() for e in eps]
    reference, drawn = data_reference_curve(embeddings, k, eps)
    assert measured["reference"] == [100.0 * reference[e] / drawn for e in eps]
