"""Health flags of a trained fold: collapsed, stuck, diverged, overfit.

A score means little when the model behind it predicts one class for every
image, or stopped learning after two epochs. These flags mark such folds next
to the score, and the report ranks collapsed and diverged trials below healthy ones.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    # Imported for types only, so the report can rank trials without loading TensorFlow.
    from sweep.training import FoldResult

# Collapsed: at least this share of validation images gets the same predicted class ...
COLLAPSE_SHARE = 0.95
# ... or accuracy equals the majority rate while AUC is within this distance of 0.5.
COLLAPSE_AUC_MARGIN = 0.05
# Stuck: over the last STUCK_EPOCHS epochs the training loss moved by less than this
# fraction of its value and training accuracy did not move at all.
STUCK_EPOCHS = 3
STUCK_TOLERANCE = 1e-3
# Overfit: training accuracy at least this high while validation AUC fell for OVERFIT_EPOCHS epochs in a row.
OVERFIT_ACCURACY = 0.98
OVERFIT_EPOCHS = 2

FLAGS = ("collapsed", "stuck", "diverged", "overfit")
# Trials with these flags never rank above healthy ones.
DISQUALIFYING = ("collapsed", "diverged")


def fold_flags(result: FoldResult, val_labels: np.ndarray) -> list[str]:
    """Return the health flags of one trained fold, in the order of FLAGS."""
    flags = []
    if is_collapsed(result, val_labels):
        flags.append("collapsed")
    if is_stuck(result):
        flags.append("stuck")
    if result.diverged:
        flags.append("diverged")
    if is_overfit(result):
        flags.append("overfit")
    return flags


def is_collapsed(result: FoldResult, val_labels: np.ndarray) -> bool:
    """Return True when the model predicts (nearly) one class, or scores the majority rate with chance AUC."""
    probabilities = result.val_probabilities
    if probabilities is None or len(val_labels) == 0 or not np.isfinite(probabilities).all():
        return False
    predicted = probabilities.argmax(axis=1)
    top_share = np.bincount(predicted).max() / len(predicted)
    majority_rate = np.bincount(val_labels).max() / len(val_labels)
    accuracy = result.final.val["accuracy"]
    auc = result.final.val["auc"]
    at_majority = abs(accuracy - majority_rate) <= 1 / len(val_labels)
    return bool(top_share >= COLLAPSE_SHARE or (at_majority and math.isfinite(auc) and abs(auc - 0.5) < COLLAPSE_AUC_MARGIN))


def is_stuck(result: FoldResult) -> bool:
    """Return True when training loss and accuracy stopped moving over the last epochs."""
    last = result.epochs[-STUCK_EPOCHS:]
    if len(last) < STUCK_EPOCHS:
        return False
    losses = [e.train["loss"] for e in last]
    accuracies = [e.train["accuracy"] for e in last]
    if not all(math.isfinite(v) for v in losses):
        return False
    moved = (max(losses) - min(losses)) / max(abs(max(losses)), 1e-12)
    return moved < STUCK_TOLERANCE and max(accuracies) == min(accuracies)


def is_overfit(result: FoldResult) -> bool:
    """Return True when training accuracy is near 1 while validation AUC fell for several epochs."""
    if len(result.epochs) < OVERFIT_EPOCHS + 1 or result.final.train["accuracy"] < OVERFIT_ACCURACY:
        return False
    aucs = [e.val["auc"] for e in result.epochs[-(OVERFIT_EPOCHS + 1) :]]
    return all(later < earlier for earlier, later in pairwise(aucs))


def trial_health(folds_flags: list[list[str]]) -> str:
    """Summarise fold flags as one label, e.g. ``healthy`` or ``collapsed 2/3, overfit 1/3``."""
    counts = {flag: sum(flag in flags for flags in folds_flags) for flag in FLAGS}
    parts = [f"{flag} {n}/{len(folds_flags)}" for flag, n in counts.items() if n]
    return ", ".join(parts) if parts else "healthy"


def is_disqualified(health: str) -> bool:
    """Return True when a trial's health label contains a flag that ranks it below healthy trials."""
    return any(flag in health for flag in DISQUALIFYING)
