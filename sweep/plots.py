"""Figures: learning curves of a trial and of the final model, and the test split's confusion matrix and ROC curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_learning_curves(epochs: pd.DataFrame, trial_number: int, path: Path) -> Path:
    """Draw loss and accuracy per epoch, one colour per fold, training dashed and validation solid.

    A dotted vertical line marks where phase 2 (fine-tuning) starts.

    Args:
        epochs: Rows of the sweep_epochs table for one trial.
        trial_number: Optuna trial number, for the title.
        path: PNG file to write.

    Returns:
        ``path``.
    """
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, fold in enumerate(sorted(epochs["fold"].unique())):
        rows = epochs[epochs["fold"] == fold].sort_values("epoch")
        colour = colours[index % len(colours)]
        for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
            axis.plot(rows["epoch"], rows[f"train_{metric}"], linestyle="--", marker="o", color=colour, label=f"fold {int(fold) + 1} train")
            axis.plot(rows["epoch"], rows[f"val_{metric}"], linestyle="-", marker="s", color=colour, label=f"fold {int(fold) + 1} validation")
    phase2 = epochs[epochs["phase"] == 2]["epoch"]
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        if len(phase2) and phase2.min() > 1:
            axis.axvline(phase2.min() - 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} per epoch")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize="small")
    figure.suptitle(f"Trial {trial_number}: training (dashed) vs validation (solid)")
    figure.tight_layout(rect=(0, 0, 0.82, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_history(history: pd.DataFrame, path: Path) -> Path:
    """Draw the final model's training loss and accuracy per epoch, marking where fine-tuning starts."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        axis.plot(history["epoch"], history[f"train_{metric}"], marker="o", label=f"training {metric}")
        phase2 = history[history["phase"] == 2]["epoch"]
        if len(phase2) and phase2.min() > 1:
            axis.axvline(phase2.min() - 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle("Final model on all cross-validation images")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_confusion(matrix: np.ndarray, class_names: tuple[str, ...], path: Path) -> Path:
    """Draw a confusion matrix with counts in the cells (rows: true class, columns: predicted)."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, str(value), ha="center", va="center")
    axis.set_xticks(range(len(class_names)), class_names, rotation=30)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title("Test split confusion matrix")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_roc(labels: np.ndarray, positive_probability: np.ndarray, path: Path) -> Path:
    """Draw the ROC curve of class 1 with its AUC."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, positive_probability)
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot(fpr, tpr, label=f"AUC {roc_auc_score(labels, positive_probability):.3f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    axis.set_xlabel("false positive rate (1 - specificity)")
    axis.set_ylabel("true positive rate (sensitivity)")
    axis.set_title("Test split ROC curve")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
