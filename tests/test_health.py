"""Tests for sweep.health: each flag with a case that triggers it and one that does not, plus real failing runs."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import make_images
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sweep.config import config_from_dict
from sweep.health import fold_flags, is_disqualified, trial_health
from sweep.model import HyperParameters
from sweep.preprocess import prepare_images
from sweep.report import rank_trials
from sweep.training import EpochResult, FoldData, FoldResult, InputSource, train_fold

METRICS = ("loss", "accuracy", "balanced_accuracy", "auc")


def _epoch(number: int, train: dict[str, float], val: dict[str, float]) -> EpochResult:
    return EpochResult(epoch=number, phase=2, learning_rate=1e-3, duration_s=1.0, train=train, val=val)


def _result(train_loss: list[float], train_acc: list[float], val_auc: list[float], probabilities: np.ndarray, val_acc: float = 0.7) -> FoldResult:
    epochs = [
        _epoch(
            i + 1, {"loss": tl, "accuracy": ta, "balanced_accuracy": ta, "auc": 0.9}, {"loss": 0.5, "accuracy": val_acc, "balanced_accuracy": 0.6, "auc": va}
        )
        for i, (tl, ta, va) in enumerate(zip(train_loss, train_acc, val_auc, strict=True))
    ]
    return FoldResult(epochs=epochs, val_probabilities=probabilities)


LABELS = np.array([0] * 30 + [1] * 70)
MIXED = np.eye(2)[np.r_[np.zeros(25, int), np.ones(5, int), np.zeros(10, int), np.ones(60, int)]] * 0.8 + 0.1
ONE_CLASS = np.tile([0.2, 0.8], (100, 1))


def test_collapsed_when_one_class_predicted() -> None:
    result = _result([0.6, 0.6, 0.6], [0.7, 0.7, 0.7], [0.5, 0.5, 0.5], ONE_CLASS, val_acc=0.7)
    assert "collapsed" in fold_flags(result, LABELS)


def test_collapsed_at_majority_rate_with_chance_auc() -> None:
    # Predictions vary but carry no information: accuracy equals the majority rate and AUC is near 0.5.
    probabilities = MIXED.copy()
    result = _result([0.6, 0.5, 0.4], [0.7, 0.72, 0.74], [0.52, 0.51, 0.53], probabilities, val_acc=0.70)
    assert "collapsed" in fold_flags(result, LABELS)


def test_healthy_fold_not_collapsed() -> None:
    result = _result([0.6, 0.5, 0.4], [0.7, 0.8, 0.85], [0.8, 0.85, 0.88], MIXED, val_acc=0.85)
    assert fold_flags(result, LABELS) == []


def test_stuck_when_loss_and_accuracy_freeze() -> None:
    stuck = _result([0.6931, 0.6931, 0.69310], [0.7, 0.7, 0.7], [0.5, 0.5, 0.5], MIXED, val_acc=0.85)
    moving = _result([0.6931, 0.65, 0.6], [0.7, 0.7, 0.7], [0.5, 0.5, 0.5], MIXED, val_acc=0.85)
    assert "stuck" in fold_flags(stuck, LABELS)
    assert "stuck" not in fold_flags(moving, LABELS)


def test_overfit_when_val_auc_falls() -> None:
    overfit = _result([0.3, 0.1, 0.05], [0.95, 0.99, 1.0], [0.9, 0.85, 0.8], MIXED, val_acc=0.85)
    improving = _result([0.3, 0.1, 0.05], [0.95, 0.99, 1.0], [0.8, 0.85, 0.9], MIXED, val_acc=0.85)
    assert "overfit" in fold_flags(overfit, LABELS)
    assert "overfit" not in fold_flags(improving, LABELS)


def test_diverged_flag() -> None:
    result = _result([0.6, math.nan], [0.7, 0.5], [0.8, math.nan], np.full((100, 2), np.nan))
    result.diverged = True
    assert fold_flags(result, LABELS) == ["diverged"]


def test_trial_health_summary() -> None:
    assert trial_health([[], []]) == "healthy"
    assert trial_health([["collapsed"], ["collapsed", "stuck"], []]) == "collapsed 2/3, stuck 1/3"
    assert is_disqualified("collapsed 1/3")
    assert is_disqualified("diverged 1/1")
    assert not is_disqualified("overfit 2/3, stuck 1/3")


def test_collapsed_trial_ranks_below_healthy(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'h.db'}", study_name="h", direction="maximize")
    for health in ("collapsed 2/2", "healthy", "overfit 1/2"):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                values=[0.0],
                params={"dropout": 0.1},
                distributions={"dropout": FloatDistribution(0, 1)},
                user_attrs={"health": health},
            )
        )
    rows = []
    for trial, auc in ((0, 0.95), (1, 0.80), (2, 0.70)):
        for fold in range(2):
            rows.append(
                {"trial_number": trial, "fold": fold, "epochs_run": 3, **{f"{s}_{m}": (auc if m == "auc" else 0.5) for s in ("train", "val") for m in METRICS}}
            )
    table = rank_trials(study, pd.DataFrame(rows), "auc")
    assert table["trial"].tolist() == [1, 2, 0]
    assert table["health"].tolist() == ["healthy", "overfit 1/2", "collapsed 2/2"]


def test_huge_learning_rate_collapses_real_training() -> None:
    # The classic failure: a learning rate far too large for fine-tuning, on imbalanced
    # data, drives the network to predict one class for every image.
    images, _ = make_images(60, seed=6)
    labels = np.r_[np.zeros(15, int), np.ones(45, int)]
    labels = np.random.default_rng(0).permutation(labels)
    prepared = prepare_images(images, 32)
    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).get_weights()
    config = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 2, "batch_size": 8, "warmup_learning_rate": 1.0}, "model": {"weights": "none"}})
    params = HyperParameters(learning_rate=1.0, decay=0.0, head_units=16, dropout=0.0, unfreeze_layers=3)
    fold = FoldData(np.arange(40), np.arange(40, 60), labels)
    result = train_fold(config, params, fold, InputSource(lambda: prepared), 2, base, seed=1)
    flags = fold_flags(result, labels[40:])
    assert "collapsed" in flags or "diverged" in flags
    sane = train_fold(
        config_from_dict({"train": {"warmup_epochs": 1, "epochs": 2, "batch_size": 8}, "model": {"weights": "none"}}),
        HyperParameters(learning_rate=1e-4, decay=0.0, head_units=16, dropout=0.0, unfreeze_layers=0),
        FoldData(np.arange(40), np.arange(40, 60), np.arange(60) % 2),
        InputSource(lambda: prepared),
        2,
        base,
        seed=1,
    )
    assert "diverged" not in fold_flags(sane, (np.arange(60) % 2)[40:])


def test_keras2_metric_name_rejected() -> None:
    from sweep.errors import SweepError

    with pytest.raises(SweepError, match=r"train.early_stopping.monitor must be a metric Keras logs, but got 'val_acc'; Keras 3 logs it as 'val_accuracy'"):
        config_from_dict({"train": {"early_stopping": {"monitor": "val_acc"}}})
    assert config_from_dict({"train": {"early_stopping": {"monitor": "val_accuracy"}}}).train.early_stopping is not None
