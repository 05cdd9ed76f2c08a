"""The one score of the final model on the held-out test split, next to the cross-validation estimate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from sweep.config import Config
from sweep.data import load_test_split
from sweep.metrics import classification_metrics
from sweep.preprocess import prepare_images
from sweep.training import predict_proba

logger = logging.getLogger(__name__)

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


def bootstrap_auc(labels: np.ndarray, probabilities: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Return the percentile 95% confidence interval of ROC AUC over bootstrap resamples of the test images.

    Resamples that hold a single class have no AUC and are skipped.
    """
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(samples):
        index = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[index])) < 2:
            continue
        scores.append(_auc(labels[index], probabilities[index]))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    return float(low), float(high)


def sensitivity_specificity(labels: np.ndarray, positive_probability: np.ndarray, threshold: float) -> tuple[float, float]:
    """Return (sensitivity, specificity) of class 1 when probabilities at or above ``threshold`` are called positive."""
    predicted = positive_probability >= threshold
    positives = labels == 1
    sensitivity = float(np.mean(predicted[positives])) if positives.any() else float("nan")
    specificity = float(np.mean(~predicted[~positives])) if (~positives).any() else float("nan")
    return sensitivity, specificity


def score_test_split(config: Config, model: keras.Model, class_names: tuple[str, ...], folder: Path, refit_s: float) -> dict[str, Any] | None:
    """Score the test split once, write test_metrics.json, plots and report.md; return the metrics, or None without a test split."""
    test = load_test_split(config.data, class_names)
    origin = config.origin
    model_mb = (folder / "model.keras").stat().st_size / 2**20
    lines = [
        "# Final model",
        "",
        f"Refit on all cross-validation images in {refit_s:.0f} s; model file {model_mb:.1f} MiB.",
    ]
    if origin is not None:
        lines.append(
            f"Cross-validation estimate (study '{origin.study}', trial {origin.trial}): {origin.objective} {origin.cv_mean:.4f} ± {origin.cv_std:.4f}."
        )
    if test is None:
        lines += ["", "The data has no held-out test split, so no test score was computed."]
        (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return None

    logger.info("scoring the held-out test split once: %d images from %s", len(test), test.origin)
    probabilities = predict_proba(model, prepare_images(test.images, config.model.input_size), np.arange(len(test)))
    metrics: dict[str, Any] = classification_metrics(test.labels, probabilities)
    metrics["n_images"] = len(test)
    metrics["auc_ci95"] = list(bootstrap_auc(test.labels, probabilities, seed=config.study.seed))
    metrics["confusion_matrix"] = confusion_matrix(test.labels, probabilities.argmax(axis=1), labels=list(range(len(class_names)))).tolist()
    if probabilities.shape[1] == 2:
        thresholds = {"0.5": 0.5}
        if origin is not None and origin.threshold is not None:
            thresholds["cv"] = origin.threshold
        metrics["thresholds"] = {}
        for name, value in thresholds.items():
            sensitivity, specificity = sensitivity_specificity(test.labels, probabilities[:, 1], value)
            metrics["thresholds"][name] = {"threshold": value, "sensitivity": sensitivity, "specificity": specificity}
    (folder / "test_metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")

    from sweep.plots import plot_confusion, plot_roc

    plot_confusion(np.array(metrics["confusion_matrix"]), class_names, folder / "test_confusion.png")
    if probabilities.shape[1] == 2:
        plot_roc(test.labels, probabilities[:, 1], folder / "test_roc.png")
    low, high = metrics["auc_ci95"]
    lines += [
        "",
        f"Test split ({len(test)} images, scored once): ROC AUC {metrics['auc']:.4f} (95% bootstrap CI {low:.4f}-{high:.4f}), "
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}.",
    ]
    for name, values in metrics.get("thresholds", {}).items():
        label = "0.5" if name == "0.5" else f"{values['threshold']:.3f} (chosen on the cross-validation predictions)"
        lines.append(f"At threshold {label}: sensitivity {values['sensitivity']:.4f}, specificity {values['specificity']:.4f}.")
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return metrics


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(probabilities.shape[1]))))
