"""Tests for sweep.store: schema, natural keys and the fold assignment round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from sweep.store import Store

METRIC_COLUMNS = {f"{split}_{metric}" for split in ("train", "val") for metric in ("loss", "accuracy", "balanced_accuracy", "auc")}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'study.db'}")


def test_schema(store: Store) -> None:
    inspector = sa.inspect(store.engine)
    assert set(inspector.get_table_names()) == {"sweep_studies", "sweep_fold_assignments", "sweep_fold_results", "sweep_epochs", "sweep_predictions"}
    epochs = {c["name"] for c in inspector.get_columns("sweep_epochs")}
    assert {"study_name", "trial_number", "fold", "epoch", "phase", "learning_rate"} | METRIC_COLUMNS <= epochs
    folds = {c["name"] for c in inspector.get_columns("sweep_fold_results")}
    assert {"trial_number", "fold", "epochs_run", "best_epoch", "duration_s", "flags", "confusion"} | METRIC_COLUMNS <= folds
    uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("sweep_epochs")}
    assert ("study_name", "trial_number", "fold", "epoch") in uniques


def test_assignment_round_trip(store: Store) -> None:
    assignment = np.array([0, 1, 2, 0, 1, 2])
    labels = np.array([0, 0, 0, 1, 1, 1])
    store.save_assignment("s", assignment, labels, None, fingerprint="f" * 64, seed=3, class_names=("a", "b"), config_yaml="x: 1\n")
    record, loaded = store.load_assignment("s")
    assert np.array_equal(loaded, assignment)
    assert record.seed == 3
    assert record.n_folds == 3
    assert record.class_names == "a\nb"
    assert store.load_assignment("other") is None


def test_fold_key_is_unique(store: Store) -> None:
    values = {"n_train": 4, "n_val": 2, "epochs_run": 3, "best_epoch": 1, "duration_s": 1.0, "val_auc": 0.8}
    store.save_fold("s", 0, 0, **values)
    with pytest.raises(IntegrityError):
        store.save_fold("s", 0, 0, **values)


def test_epoch_rows_readable_by_pandas(store: Store) -> None:
    for epoch in (1, 2):
        store.save_epoch("s", 5, 1, epoch=epoch, phase=epoch, learning_rate=1e-3, duration_s=0.5, val_auc=0.5 + epoch / 10)
    store.save_epoch("s", 5, 1, epoch=2, phase=2, learning_rate=1e-3, duration_s=0.5, val_auc=0.9)
    frame = pd.read_sql("SELECT * FROM sweep_epochs ORDER BY epoch", store.engine)
    assert frame["val_auc"].tolist() == pytest.approx([0.6, 0.9])
    assert frame["trial_number"].tolist() == [5, 5]


def test_predictions_round_trip(store: Store) -> None:
    store.save_predictions("s", 2, 1, np.array([4, 9]), np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]]))
    frame = pd.read_sql("SELECT * FROM sweep_predictions ORDER BY sample_index", store.engine)
    assert frame["sample_index"].tolist() == [4, 9]
    assert frame["label"].tolist() == [0, 1]
    assert frame["probabilities"].tolist() == ["[0.8, 0.2]", "[0.3, 0.7]"]
