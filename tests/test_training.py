"""Tests for sweep.training: what each phase really changes, epoch records and reproducibility."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import make_images

from sweep.config import config_from_dict
from sweep.model import HyperParameters, conv_layers
from sweep.preprocess import prepare_images
from sweep.training import FoldData, FoldTrainer, InputSource, train_fold

PARAMS = HyperParameters(learning_rate=1e-3, decay=1e-3, head_units=8, dropout=0.0, unfreeze_layers=2)


@pytest.fixture(scope="module")
def data() -> tuple[FoldData, InputSource]:
    images, labels = make_images(32)
    prepared = prepare_images(images, 32)
    return FoldData(np.arange(24), np.arange(24, 32), labels), InputSource(lambda: prepared)


@pytest.fixture(scope="module")
def base_weights() -> list[np.ndarray]:
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).get_weights()


def test_phases_change_only_trainable_layers(data: tuple[FoldData, InputSource], base_weights: list[np.ndarray]) -> None:
    config = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 1, "batch_size": 8}, "model": {"weights": "none"}})
    trainer = FoldTrainer(config, PARAMS, data[1], 2, base_weights, seed=1)
    snapshots: list[list[np.ndarray]] = []

    def after_epoch(_: object) -> None:
        snapshots.append([layer.get_weights()[0].copy() for layer in conv_layers(trainer.model)])

    trainer.train(data[0], seed=1, on_epoch=after_epoch)
    initial = [base_weights[2 * i] for i in range(13)]
    after_phase1, after_phase2 = snapshots
    assert all(np.array_equal(a, b) for a, b in zip(initial, after_phase1, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(initial[:11], after_phase2[:11], strict=True))
    assert not np.array_equal(initial[11], after_phase2[11])
    assert not np.array_equal(initial[12], after_phase2[12])


def test_epochs_recorded_with_both_splits(data: tuple[FoldData, InputSource]) -> None:
    config = config_from_dict({"train": {"warmup_epochs": 2, "epochs": 1, "batch_size": 8}, "model": {"weights": "none"}})
    result = train_fold(config, PARAMS, *data, 2, None, seed=2)
    assert [e.epoch for e in result.epochs] == [1, 2, 3]
    assert [e.phase for e in result.epochs] == [1, 1, 2]
    assert set(result.final.train) == set(result.final.val) == {"loss", "accuracy", "balanced_accuracy", "auc"}
    assert result.epochs[0].learning_rate == pytest.approx(1e-3)
    # Three steps of 8 images each in phase 2: lr / (1 + decay * 3).
    assert result.final.learning_rate == pytest.approx(1e-3 / (1 + 1e-3 * 3), rel=1e-4)
    assert result.best_epoch("auc") == 1


def test_same_seed_same_metrics(data: tuple[FoldData, InputSource]) -> None:
    config = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 1, "batch_size": 8}, "model": {"weights": "none"}})
    first = train_fold(config, PARAMS, *data, 2, None, seed=5)
    second = train_fold(config, PARAMS, *data, 2, None, seed=5)
    assert [e.val["loss"] for e in first.epochs] == pytest.approx([e.val["loss"] for e in second.epochs], rel=1e-5)
