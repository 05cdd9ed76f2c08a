"""Tests for sweep.report: ranking order, ties and non-completed trials."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweep.report import pruning_savings, rank_trials


def _study(tmp_path: Path, direction: str, states: list[TrialState]) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="r", direction=direction)
    for state in states:
        values = [0.0] if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, values=values, params={"dropout": 0.1}, distributions={"dropout": FloatDistribution(0, 1)}))
    return study


def _folds(scores: dict[int, list[float]], metric: str = "auc") -> pd.DataFrame:
    rows = []
    for trial, values in scores.items():
        for fold, value in enumerate(values):
            row = {"trial_number": trial, "fold": fold, "epochs_run": 3}
            for split in ("train", "val"):
                for m in ("loss", "accuracy", "balanced_accuracy", "auc"):
                    row[f"{split}_{m}"] = value if m == metric else 0.5
            rows.append(row)
    return pd.DataFrame(rows)


def test_rank_by_mean_then_std(tmp_path: Path) -> None:
    states = [TrialState.COMPLETE] * 4 + [TrialState.PRUNED]
    study = _study(tmp_path, "maximize", states)
    folds = _folds({0: [0.7, 0.9], 1: [0.8, 0.8], 2: [0.95, 0.95], 3: [0.6, 0.6], 4: [0.99]})
    table = rank_trials(study, folds, "auc")
    assert table["trial"].tolist() == [2, 1, 0, 3, 4]
    assert table["rank"].tolist()[:4] == [1, 2, 3, 4]
    assert pd.isna(table["rank"].iloc[4])
    assert table["state"].iloc[4] == "PRUNED"
    assert table["val_auc_mean"].iloc[2] == pytest.approx(0.8)
    assert table["val_auc_std"].iloc[2] == pytest.approx(0.1)
    assert table["epochs_run"].iloc[0] == 6


def test_loss_ranks_ascending(tmp_path: Path) -> None:
    study = _study(tmp_path, "minimize", [TrialState.COMPLETE] * 3)
    folds = _folds({0: [0.5, 0.5], 1: [0.2, 0.4], 2: [0.9, 0.9]}, metric="loss")
    assert rank_trials(study, folds, "loss")["trial"].tolist() == [1, 0, 2]


def test_failed_trial_without_folds(tmp_path: Path) -> None:
    study = _study(tmp_path, "maximize", [TrialState.COMPLETE, TrialState.FAIL])
    table = rank_trials(study, _folds({0: [0.8, 0.9]}), "auc")
    assert table["state"].tolist() == ["COMPLETE", "FAIL"]
    assert math.isnan(table["val_auc_mean"].iloc[1])
    assert table["folds"].tolist() == [2, 0]


def test_pruning_savings_counts_skipped_folds(tmp_path: Path) -> None:
    study = _study(tmp_path, "maximize", [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED])
    folds = _folds({0: [0.9, 0.9, 0.9], 1: [0.5], 2: [0.6, 0.55]})
    folds["duration_s"] = [10.0, 12.0, 14.0, 8.0, 9.0, 7.0]
    table = rank_trials(study, folds, "auc")
    savings = pruning_savings(table, folds, n_folds=3, epochs_per_fold=5)
    assert savings.pruned == 2
    assert savings.folds_run == 3
    assert savings.folds_skipped == 3
    assert savings.epochs_skipped == 15
    assert savings.seconds_saved == pytest.approx(3 * 10.0)


def test_pruning_savings_without_pruned_trials(tmp_path: Path) -> None:
    study = _study(tmp_path, "maximize", [TrialState.COMPLETE])
    folds = _folds({0: [0.9, 0.8]})
    folds["duration_s"] = 5.0
    savings = pruning_savings(rank_trials(study, folds, "auc"), folds, n_folds=2, epochs_per_fold=3)
    assert (savings.pruned, savings.folds_skipped, savings.epochs_skipped, savings.seconds_saved) == (0, 0, 0, 0.0)
