"""Stratified k-fold assignment, computed once per study so every trial trains on the same splits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from sweep.errors import SweepError


def check_folds(labels: np.ndarray, folds: int, groups: np.ndarray | None = None) -> None:
    """Raise SweepError when ``folds`` cannot give every fold a sample of every class.

    With groups, the limit is the number of distinct groups holding each class.
    """
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    smallest = int(counts.min())
    if folds < 2 or folds > smallest:
        raise SweepError(f"cv.folds must be >= 2 and <= the smallest class count ({smallest}), but got {folds}")
    if groups is not None:
        n_groups = len(np.unique(groups))
        if folds > n_groups:
            raise SweepError(f"cv.folds must be <= the number of groups ({n_groups}), but got {folds}")


def assign_folds(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None, clusters: np.ndarray | None = None) -> np.ndarray:
    """Return the validation fold index (0 .. folds-1) of every sample.

    Uses scikit-learn's StratifiedKFold, or StratifiedGroupKFold when groups are
    given so that all images of one patient fall in the same fold: a patient seen
    in training and validation would inflate the validation score.

    Args:
        labels: Class index per sample.
        folds: Number of folds.
        seed: Seed of the shuffle before splitting.
        groups: Optional group (patient) id per sample.
        clusters: Optional index of the first identical image, per sample. Identical
            images always share a fold, so no copy is on both sides of a split.

    Returns:
        An int array of shape (N,).
    """
    check_folds(labels, folds, groups)
    if clusters is not None and groups is None:
        # Split one representative of each set of identical images, then give the copies its fold.
        _, first, inverse = np.unique(clusters, return_index=True, return_inverse=True)
        if len(first) == len(labels):
            return assign_folds(labels, folds, seed)
        return assign_folds(labels[first], folds, seed)[inverse]
    if clusters is not None and groups is not None:
        groups = _merge(np.asarray(groups).astype(str), clusters)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    placeholder = np.zeros(len(labels))
    if groups is None:
        splitter: StratifiedKFold | StratifiedGroupKFold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(placeholder, labels)
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(placeholder, labels, groups)
    for fold, (_, validation) in enumerate(splits):
        assignment[validation] = fold
    return assignment


def _merge(groups: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Join groups that share an identical image into one group (union-find over group labels)."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    first_group: dict[int, str] = {}
    for group, cluster in zip(groups.tolist(), clusters.tolist(), strict=True):
        other = first_group.setdefault(cluster, group)
        a, b = root(group), root(other)
        if a != b:
            parent[a] = b
    return np.array([root(g) for g in groups.tolist()])


def iter_folds(assignment: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (fold, training indices, validation indices) for a stored assignment."""
    for fold in range(int(assignment.max()) + 1):
        yield fold, np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
