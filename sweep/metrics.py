"""Classification metrics of one set of predictions, computed with scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

# Probabilities are clipped away from 0 and 1 before the log loss, as Keras's
# cross-entropy does, so one confident mistake gives a large but finite loss.
EPSILON = 1e-7


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Compute loss, accuracy, balanced accuracy and ROC AUC.

    Args:
        labels: True class index per image, shape (N,).
        probabilities: Predicted class probabilities, shape (N, K).

    Returns:
        A mapping of metric name to value. AUC is one-vs-rest for more than two
        classes, and NaN when the labels contain a single class. Every metric is
        NaN when a probability is not finite, as from a diverged model.
    """
    n_classes = probabilities.shape[1]
    if not np.isfinite(probabilities).all():
        return dict.fromkeys(("loss", "accuracy", "balanced_accuracy", "auc"), math.nan)
    clipped = np.clip(probabilities, EPSILON, 1.0 - EPSILON)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    with warnings.catch_warnings():
        # A fold missing a class makes balanced accuracy warn, and the NaN AUC already reports it.
        warnings.simplefilter("ignore", (UndefinedMetricWarning, UserWarning))
        values = {
            "loss": float(log_loss(labels, clipped, labels=list(range(n_classes)))),
            "accuracy": float(accuracy_score(labels, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "auc": _auc(labels, clipped),
        }
    return values


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    if len(present) < probabilities.shape[1]:
        # One-vs-rest AUC needs every class among the labels; average over those present.
        scores = [roc_auc_score(labels == k, probabilities[:, k]) for k in present]
        return float(np.mean(scores))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(probabilities.shape[1]))))
