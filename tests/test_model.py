"""Tests for sweep.model, sweep.preprocess and sweep.metrics: freezing, schedule and inputs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras.applications import vgg16

from sweep.config import TrainSection
from sweep.metrics import classification_metrics
from sweep.model import HyperParameters, build_model, conv_layers, make_optimizer, trained_convolutions
from sweep.network import Network
from sweep.preprocess import prepare_images

PARAMS = HyperParameters(learning_rate=1e-4, decay=1e-3, head_units=8, dropout=0.2, unfreeze_layers=3)
HEAD = ["head_dense", "head_output"]


@pytest.fixture(scope="module")
def network() -> Network:
    return Network(2, 32, None, TrainSection(), "avg", "float32", head_width=8, max_unfreeze=13)


def _names(network: Network, convolutions: tuple[str, ...]) -> list[str]:
    return sorted({variable.path.split("/")[0] for variable in network.variables(convolutions)})


def test_phase1_trains_head_only(network: Network) -> None:
    assert trained_convolutions(1, unfreeze_layers=3) == ()
    assert _names(network, trained_convolutions(1, 3)) == HEAD


def test_phase2_unfreezes_top_convolutions(network: Network) -> None:
    convolutions = trained_convolutions(2, unfreeze_layers=3)
    assert convolutions == ("block5_conv1", "block5_conv2", "block5_conv3")
    assert _names(network, convolutions) == sorted(["block5_conv1", "block5_conv2", "block5_conv3", *HEAD])
    n_trainable = sum(int(np.prod(w.shape)) for w in network.variables(convolutions))
    expected = 3 * (3 * 3 * 512 * 512 + 512) + (512 * 8 + 8) + (8 * 2 + 2)
    assert n_trainable == expected


def test_phase2_zero_layers_is_head_only() -> None:
    assert trained_convolutions(2, unfreeze_layers=0) == ()


def test_phase2_all_layers(network: Network) -> None:
    convolutions = trained_convolutions(2, unfreeze_layers=13)
    assert len(convolutions) == 13
    assert convolutions[:2] == ("block1_conv1", "block1_conv2")
    assert len(network.variables(convolutions)) == 2 * 13 + 4


def test_base_weights_are_loaded() -> None:
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = [np.full(w.shape, 0.01 * i, dtype=np.float32) for i, w in enumerate(base.get_weights())]
    model = build_model(3, 32, weights, PARAMS)
    assert np.allclose(conv_layers(model)[0].get_weights()[1], 0.01)
    assert model.output_shape == (None, 3)


def test_inverse_time_decay() -> None:
    optimizer = make_optimizer(TrainSection(), learning_rate=1e-3, decay=0.5)
    schedule = optimizer._learning_rate
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(2)) == pytest.approx(1e-3 / (1 + 0.5 * 2))


def test_no_decay_is_constant() -> None:
    optimizer = make_optimizer(TrainSection(optimizer="sgd"), learning_rate=1e-2)
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(1e-2)
    assert isinstance(optimizer, keras.optimizers.SGD)


def test_prepare_grayscale_matches_vgg16_preprocessing() -> None:
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    prepared = prepare_images(images, 32)
    expected = vgg16.preprocess_input(np.repeat(images[..., None].astype(np.float32), 3, axis=-1))
    assert prepared.shape == (4, 32, 32, 3)
    assert np.allclose(prepared, expected)


def test_prepare_resizes_mixed_sizes() -> None:
    images = [np.full((28, 28), 100, np.uint8), np.full((50, 40, 3), 100, np.uint8), np.full((64, 64, 4), 100, np.uint8)]
    prepared = prepare_images(images, 48)
    assert prepared.shape == (3, 48, 48, 3)
    assert np.allclose(prepared[0], prepared[1], atol=1e-3)
    assert np.allclose(prepared[1], prepared[2], atol=1e-3)


def test_prepare_scales_unit_floats() -> None:
    images = np.full((2, 32, 32), 0.5, dtype=np.float32)
    assert np.allclose(prepare_images(images, 32), prepare_images(np.full((2, 32, 32), 127.5, np.float32), 32))


def test_metrics_values() -> None:
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    values = classification_metrics(labels, probabilities)
    assert values["accuracy"] == pytest.approx(0.75)
    assert values["balanced_accuracy"] == pytest.approx(0.75)
    assert values["auc"] == pytest.approx(1.0)
    assert values["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])), rel=1e-5)


def test_metrics_multiclass_and_nan() -> None:
    labels = np.array([0, 1, 2, 2])
    probabilities = np.eye(3)[[0, 1, 2, 1]] * 0.9 + 0.1 / 3
    values = classification_metrics(labels, probabilities)
    assert values["accuracy"] == pytest.approx(0.75)
    assert 0.5 < values["auc"] <= 1.0
    assert np.isnan(classification_metrics(labels, np.full((4, 3), np.nan))["auc"])
