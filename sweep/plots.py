"""Learning-curve figure of one trial: training and validation loss and accuracy per fold."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
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
