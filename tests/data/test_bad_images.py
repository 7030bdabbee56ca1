"""Unreadable files: the scan, dropping them, and same-class substitution at first touch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefiles import BROKEN_KINDS, break_file, image_pixels, write_tree
from torch.utils.data import DataLoader

from protogmm.data import (
    BadImageError,
    ClassFolderImages,
    LabelledSubset,
    SkipBadImages,
    TransformedDataset,
    drop_bad_images,
    scan_images,
)


@pytest.fixture
def broken_tree(tmp_path: Path) -> tuple[ClassFolderImages, list[Path]]:
    """Class a: files 0-3, class b: 4-7, class c: 8-9; one broken file of each kind.

    Broken: 1 (zero bytes), 2 (text renamed .png), 5 (truncated PNG), 9 (corrupt PNG).
    """
    paths = write_tree(tmp_path, {"a": 4, "b": 4, "c": 2})
    for index, kind in zip((1, 2, 5, 9), BROKEN_KINDS, strict=True):
        break_file(paths[index], kind)
    return ClassFolderImages(tmp_path), paths


def test_scan_lists_exactly_the_broken_files_in_order(broken_tree) -> None:
    ds, paths = broken_tree
    bad = scan_images(ds, workers=2)
    assert [b.index for b in bad] == [1, 2, 5, 9]
    assert [b.path for b in bad] == [str(paths[i]) for i in (1, 2, 5, 9)]
    assert all(b.path in b.reason for b in bad)
    assert scan_images(LabelledSubset(ds, [0, 3, 4]), workers=1) == []


def test_drop_keeps_path_label_pairs(broken_tree) -> None:
    ds, paths = broken_tree
    keep = drop_bad_images(ds, scan_images(ds))
    assert keep.tolist() == [0, 3, 4, 6, 7, 8]
    kept = LabelledSubset(ds, keep)
    assert kept.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert [Path(p) for p, _ in kept.samples] == [paths[i] for i in keep]
    # Every item decodes to its own file's pixels (seed = file number) with its own label.
    for position, index in enumerate(keep):
        image, label = kept[position]
        np.testing.assert_array_equal(np.asarray(image), image_pixels(int(index)))
        assert label == ds.labels[index]


def test_drop_refuses_a_class_with_no_readable_image(tmp_path: Path) -> None:
    paths = write_tree(tmp_path, {"a": 2, "b": 2})
    break_file(paths[2], "zero")
    break_file(paths[3], "text")
    ds = ClassFolderImages(tmp_path)
    with pytest.raises(
        ValueError, match=f"every image of class 'b' is unreadable \\(e.g. {paths[2]}\\)"
    ):
        drop_bad_images(ds, scan_images(ds))


def test_error_policy_raises_at_first_touch(broken_tree) -> None:
    ds, paths = broken_tree
    loader = DataLoader(TransformedDataset(ds, np.asarray), batch_size=4)
    with pytest.raises(BadImageError, match=str(paths[1])):
        list(loader)


def test_skip_substitutes_the_next_readable_image_of_the_same_class(broken_tree, caplog) -> None:
    ds, paths = broken_tree
    skipping = SkipBadImages(ds)
    with caplog.at_level(logging.WARNING, logger="protogmm.data"):
        items = [skipping[i] for i in range(len(skipping))]
    # Bad 1 and 2 (class a) -> 3, the next readable of class a; 5 (class b) -> 6;
    # 9 (class c, last) -> wraps round to 8.
    substitute = {1: 3, 2: 3, 5: 6, 9: 8}
    for index, (image, label) in enumerate(items):
        assert label == ds.labels[index]  # labels never shift
        source = substitute.get(index, index)
        np.testing.assert_array_equal(np.asarray(image), image_pixels(source))
    assert skipping.skipped_indices().tolist() == [1, 2, 5, 9]
    assert skipping.skipped_paths() == [str(paths[i]) for i in (1, 2, 5, 9)]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and all("data.images.on_bad=skip" in line for line in logged)


def test_skip_result_does_not_depend_on_the_touch_order(broken_tree) -> None:
    ds, _ = broken_tree
    forward = SkipBadImages(ds)
    backward = SkipBadImages(ds)
    a = [np.asarray(forward[i][0]) for i in range(len(ds))]
    b = [np.asarray(backward[i][0]) for i in reversed(range(len(ds)))][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_skip_flags_are_shared_with_loader_workers(broken_tree) -> None:
    ds, paths = broken_tree
    skipping = SkipBadImages(ds)
    loader = DataLoader(TransformedDataset(skipping, np.asarray), batch_size=5, num_workers=2)
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert labels.tolist() == ds.labels.tolist()
    assert skipping.skipped_paths() == [str(paths[i]) for i in (1, 2, 5, 9)]


def test_skip_a_class_with_no_readable_image_is_an_error(tmp_path: Path) -> None:
    paths = write_tree(tmp_path, {"a": 2, "b": 2})
    break_file(paths[2], "truncated")
    break_file(paths[3], "corrupt")
    skipping = SkipBadImages(ClassFolderImages(tmp_path))
    skipping[0]
    with pytest.raises(
        ValueError, match=f"every image of class 'b' is unreadable \\(e.g. {paths[3]}\\)"
    ):
        skipping[3]  # the touched file is named first


def test_skip_within_a_subset_stays_inside_it(broken_tree) -> None:
    ds, _ = broken_tree
    subset = LabelledSubset(ds, [4, 5, 7])  # class b: good, bad, good
    skipping = SkipBadImages(subset)
    image, label = skipping[1]
    assert label == 1
    np.testing.assert_array_equal(np.asarray(image), image_pixels(7))  # not file 6: outside
    assert skipping.skipped_paths() == [subset.samples[1][0]]
