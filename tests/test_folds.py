"""Tests for sweep.folds: the invariants every fold assignment must keep."""

from __future__ import annotations

import numpy as np
import pytest

from sweep.errors import SweepError
from sweep.folds import assign_folds, check_folds, iter_folds


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.parametrize(("counts", "folds"), [([30, 90], 3), ([7, 13, 21], 5), ([10, 10], 2), ([50, 3], 3)])
def test_no_overlap_and_class_ratio_kept(counts: list[int], folds: int) -> None:
    labels = _labels(counts)
    assignment = assign_folds(labels, folds, seed=0)
    assert set(assignment.tolist()) == set(range(folds))
    seen = np.zeros(len(labels), dtype=int)
    for _, train, val in iter_folds(assignment):
        assert not set(train) & set(val)
        assert len(train) + len(val) == len(labels)
        seen[val] += 1
        for k, n in enumerate(counts):
            expected = n * len(val) / len(labels)
            assert abs(np.sum(labels[val] == k) - expected) <= 1
    assert (seen == 1).all()


def test_same_seed_same_folds() -> None:
    labels = _labels([40, 60])
    assert np.array_equal(assign_folds(labels, 4, seed=7), assign_folds(labels, 4, seed=7))
    assert not np.array_equal(assign_folds(labels, 4, seed=7), assign_folds(labels, 4, seed=8))


def test_label_sorted_input_still_balanced() -> None:
    # The classic Keras validation_split trap: labels sorted, last 20% all one class.
    labels = np.array([0] * 50 + [1] * 50)
    for _, _, val in iter_folds(assign_folds(labels, 5, seed=0)):
        assert np.sum(labels[val] == 0) == np.sum(labels[val] == 1) == 10


def test_groups_never_cross_folds() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 4)
    labels = np.repeat(rng.integers(0, 2, 30), 4)
    assignment = assign_folds(labels, 3, seed=0, groups=groups)
    for group in np.unique(groups):
        assert len(set(assignment[groups == group])) == 1


def test_too_many_folds() -> None:
    with pytest.raises(SweepError, match=r"^cv.folds must be >= 2 and <= the smallest class count \(3\), but got 4$"):
        check_folds(_labels([3, 10]), 4)


def test_more_folds_than_groups() -> None:
    labels = np.array([0, 1] * 6)
    groups = np.array([0, 0, 1, 1, 2, 2] * 2)
    with pytest.raises(SweepError, match=r"cv.folds must be <= the number of groups \(3\), but got 4"):
        check_folds(labels, 4, groups)


def test_identical_images_share_a_fold() -> None:
    labels = _labels([30, 30])
    clusters = np.arange(60)
    clusters[[5, 17, 42]] = 3  # images 3, 5, 17 and 42 are identical
    clusters[[50]] = 8
    assignment = assign_folds(labels, 3, seed=0, clusters=clusters)
    assert len({assignment[i] for i in (3, 5, 17, 42)}) == 1
    assert assignment[50] == assignment[8]
    assert np.array_equal(assign_folds(labels, 3, seed=0, clusters=np.arange(60)), assign_folds(labels, 3, seed=0))


def test_identical_images_join_their_groups() -> None:
    labels = np.array([0, 1] * 10)
    groups = np.arange(20) // 2
    clusters = np.arange(20)
    clusters[19] = 0  # an image of group 9 is a copy of one in group 0
    assignment = assign_folds(labels, 2, seed=0, groups=groups, clusters=clusters)
    assert len(set(assignment[groups == 0]) | set(assignment[groups == 9])) == 1
