"""Tests for sweep.network: the padded head, and one network reused by trials with other hyperparameters."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_images

from sweep.config import TrainSection, config_from_dict
from sweep.features import CacheKey, FeatureCache
from sweep.model import AdjustableInverseTimeDecay, HyperParameters, build_model, prefix_model
from sweep.network import Network, apply_adam, is_plain_adam
from sweep.preprocess import prepare_images
from sweep.training import FoldData, FoldResult, FoldTrainer, InputSource

KEY = CacheKey(data="d", weights="w", input_size=32, preprocessing="p", precision="float32")
CONFIG = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 2, "batch_size": 8}, "model": {"weights": "none"}})


@pytest.fixture(scope="module")
def base_weights() -> list[np.ndarray]:
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).get_weights()


@pytest.fixture(scope="module")
def prepared() -> tuple[np.ndarray, np.ndarray]:
    images, labels = make_images(40, seed=6)
    return prepare_images(images, 32), labels


def _network(base_weights: list[np.ndarray], width: int = 32, max_unfreeze: int = 3) -> Network:
    return Network(2, 32, base_weights, TrainSection(), "avg", "float32", head_width=width, max_unfreeze=max_unfreeze)


def _cached_source(prepared: np.ndarray, base_weights: list[np.ndarray], folder: Path) -> InputSource:
    cache = FeatureCache(folder, KEY)
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=1, dropout=0.0, unfreeze_layers=0)

    def features(cut: str) -> np.ndarray:
        def fill(outputs: dict[str, np.ndarray]) -> None:
            outputs[cut][:] = prefix_model(build_model(2, 32, base_weights, params), cut).predict_on_batch(prepared)

        return cache.get(cut, len(prepared), fill)

    return InputSource(lambda: prepared, features)


def test_padded_head_starts_as_the_exact_one(base_weights: list[np.ndarray], prepared: tuple[np.ndarray, np.ndarray]) -> None:
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=12, dropout=0.3, unfreeze_layers=2)
    network = _network(base_weights)
    network.restart(network.head_start(params, seed=7))
    exact = build_model(2, 32, base_weights, params, seed=7)
    images = prepared[0][:8]
    padded = np.asarray(network.model(None).predict_on_batch(images))
    assert np.allclose(padded, exact.predict_on_batch(images), rtol=1e-5, atol=1e-6)
    assert float(network.head_mask.mask.numpy().sum()) == 12.0


def test_masked_units_and_export(base_weights: list[np.ndarray], prepared: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = prepared
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=8, dropout=0.2, unfreeze_layers=2)
    trainer = FoldTrainer(CONFIG, params, InputSource(lambda: images), 2, None, seed=1, network=_network(base_weights))
    trainer.train(FoldData(np.arange(32), np.arange(32, 40), labels), seed=1)
    kernel = trainer.network.head_dense.kernel.numpy()
    assert np.abs(kernel[:, :8]).sum() > 0
    assert not kernel[:, 8:].any()
    assert not trainer.network.head_output.kernel.numpy()[8:].any()
    exported = trainer.model
    assert exported.get_layer("head_dense").kernel.shape == (512, 8)
    padded = np.asarray(trainer.network.model(None).predict_on_batch(images))
    assert np.allclose(exported.predict_on_batch(images), padded, rtol=1e-5, atol=1e-6)


def test_reused_network_gives_what_a_fresh_one_gives(base_weights: list[np.ndarray], prepared: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images, labels = prepared
    source = _cached_source(images, base_weights, tmp_path)
    fold = FoldData(np.arange(30), np.arange(30, 40), labels)
    first = HyperParameters(learning_rate=1e-3, decay=1e-2, head_units=24, dropout=0.4, unfreeze_layers=3)
    second = HyperParameters(learning_rate=3e-4, decay=1e-3, head_units=8, dropout=0.1, unfreeze_layers=3)

    shared = _network(base_weights)
    FoldTrainer(CONFIG, first, source, 2, None, seed=1, network=shared).train(fold, seed=1)
    traced = dict(shared.steps)
    reused = FoldTrainer(CONFIG, second, source, 2, None, seed=2, network=shared).train(fold, seed=2)
    assert shared.steps == traced  # no new tracing for a trial with the same cuts
    fresh = FoldTrainer(CONFIG, second, source, 2, None, seed=2, network=_network(base_weights)).train(fold, seed=2)
    _assert_same_epochs(reused, fresh)
    assert reused.final.learning_rate == pytest.approx(3e-4 / (1 + 1e-3 * 8), rel=1e-5)


def test_trial_beyond_the_network_is_refused(base_weights: list[np.ndarray], prepared: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = prepared
    network = _network(base_weights, width=8, max_unfreeze=1)
    wide = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=16, dropout=0.0, unfreeze_layers=1)
    with pytest.raises(ValueError, match="head_units 16 exceeds the network's head width 8"):
        network.head_start(wide, seed=0)
    deep = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=8, dropout=0.0, unfreeze_layers=2)
    trainer = FoldTrainer(CONFIG, deep, InputSource(lambda: images), 2, None, seed=0, network=network)
    with pytest.raises(ValueError, match="block5_conv2"):
        trainer.train(FoldData(np.arange(32), np.arange(32, 40), labels), seed=0)


def _assert_same_epochs(a: FoldResult, b: FoldResult) -> None:
    assert len(a.epochs) == len(b.epochs)
    for x, y in zip(a.epochs, b.epochs, strict=True):
        for metric in ("loss", "accuracy", "auc"):
            assert x.val[metric] == pytest.approx(y.val[metric], rel=1e-5, abs=1e-6), (x.epoch, metric)
            assert x.train[metric] == pytest.approx(y.train[metric], rel=1e-5, abs=1e-6), (x.epoch, metric)


def _adam_steps(fused: bool, start: list[np.ndarray], steps: list[list[np.ndarray]]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Apply Adam steps with decay to copies of ``start``, and return the weights, the optimizer's variables and its step count."""
    variables = [keras.Variable(value) for value in start]
    optimizer = keras.optimizers.Adam(learning_rate=AdjustableInverseTimeDecay(1e-2, 0.5))
    optimizer.build(variables)
    assert is_plain_adam(optimizer)

    @tf.function
    def step(gradients: list[tf.Tensor]) -> None:
        if fused:
            apply_adam(optimizer, gradients, variables)
        else:
            optimizer.apply(gradients, variables)

    for gradients in steps:
        step([tf.constant(g) for g in gradients])
    return [np.asarray(v) for v in variables], [np.asarray(v) for v in optimizer.variables], int(optimizer.iterations)


def test_fused_adam_matches_keras_adam() -> None:
    rng = np.random.default_rng(4)
    shapes = [(3, 3, 8, 16), (16,), (16, 2)]
    start = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    steps = [[rng.standard_normal(shape).astype(np.float32) for shape in shapes] for _ in range(4)]
    keras_weights, keras_state, keras_count = _adam_steps(False, start, steps)
    fused_weights, fused_state, fused_count = _adam_steps(True, start, steps)
    assert keras_count == 4
    assert fused_count == 4
    for expected, actual in zip(keras_weights + keras_state, fused_weights + fused_state, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # The weights moved, so the comparison is not between two untouched copies.
    assert not np.allclose(keras_weights[0], start[0])


def test_fused_adam_setting() -> None:
    assert Network(2, 32, None, TrainSection(), "avg", "float32", head_width=8, max_unfreeze=1).fused_adam
    assert not Network(2, 32, None, TrainSection(fused_adam=False), "avg", "float32", head_width=8, max_unfreeze=1).fused_adam
    assert not Network(2, 32, None, TrainSection(optimizer="sgd"), "avg", "float32", head_width=8, max_unfreeze=1).fused_adam


def test_adam_options_fall_back_to_keras() -> None:
    assert not is_plain_adam(keras.optimizers.Adam(amsgrad=True))
    assert not is_plain_adam(keras.optimizers.Adam(clipnorm=1.0))
    assert not is_plain_adam(keras.optimizers.SGD())
    assert not is_plain_adam(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()))
