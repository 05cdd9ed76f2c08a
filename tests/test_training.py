"""Tests for sweep.training: what each phase really changes, epoch records and reproducibility."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_images

from sweep.config import config_from_dict
from sweep.model import HyperParameters, conv_layers
from sweep.preprocess import prepare_images
from sweep.training import BatchFeeder, FoldData, FoldTrainer, InputSource, train_fold

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


def test_feeder_yields_every_row_once_without_autotuning() -> None:
    inputs = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2, 1)
    labels = np.arange(10) % 2
    feeder = BatchFeeder(inputs)
    order = np.array([7, 2, 9, 0, 5])
    batches = [(x.numpy(), y.numpy()) for x, y in feeder.epoch(labels, order, 2)]
    assert [len(y) for _, y in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), inputs[order])
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels[order])
    # Autotuning stalled epochs over stored features, so the pipeline must keep it off.
    assert feeder.dataset.options().autotune.enabled is False


def _mapped_mb(path: Path) -> float:
    """Return how much of ``path`` is resident in this process's memory, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            # A mapping's first line. Anonymous mappings have no path.
            inside = len(parts) >= 6 and parts[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(parts[1])
    return total / 1024


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_release_pages_drops_mapped_features(tmp_path: Path) -> None:
    path = tmp_path / "features.npy"
    np.save(path, np.ones((64, 256, 256), dtype=np.float32))  # 64 MiB
    mapped = np.load(path, mmap_mode="r")
    source = InputSource(lambda: mapped, lambda cut: mapped)
    feeder = source.feeder("block5_pool")
    assert float(np.asarray(feeder.inputs).sum()) == 64 * 256 * 256
    read = _mapped_mb(path)
    source.release_pages()
    released = _mapped_mb(path)
    # After one pass the kernel keeps only part of a file mapped, but here at least 8 MiB.
    assert read > 8
    assert released < 1
    # The data is still there after its pages were dropped.
    assert float(mapped[-1].sum()) == 256 * 256
