"""Tests for sweep.features and sweep.precision: cache key, invalidation, budget, equivalence, precision choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import make_images

from sweep.config import config_from_dict
from sweep.errors import SweepError
from sweep.features import CacheKey, FeatureCache, check_budget, cuts_for_config, feature_shape, weights_fingerprint
from sweep.model import BASE_LAYERS, HyperParameters, build_model, cut_layer, prefix_model, suffix_model
from sweep.precision import choose_precision
from sweep.preprocess import prepare_images
from sweep.training import FoldData, FoldResult, FoldTrainer, InputSource, train_fold

KEY = CacheKey(data="d" * 64, weights="w" * 64, input_size=32, preprocessing="vgg16", precision="float32")


@pytest.mark.parametrize("change", [{"data": "e" * 64}, {"weights": "x" * 64}, {"input_size": 64}, {"preprocessing": "other"}, {"precision": "mixed_bfloat16"}])
def test_key_digest_changes_with_each_field(change: dict[str, object]) -> None:
    assert dataclasses.replace(KEY, **change).digest("block5_pool") != KEY.digest("block5_pool")


def test_key_digest_depends_on_cut() -> None:
    assert KEY.digest("block5_pool") != KEY.digest("block4_pool")
    assert KEY.digest("block5_pool") == CacheKey(**dataclasses.asdict(KEY)).digest("block5_pool")


def test_weights_fingerprint() -> None:
    arrays = [np.ones((3, 3), np.float32), np.zeros(3, np.float32)]
    assert weights_fingerprint(arrays) == weights_fingerprint([a.copy() for a in arrays])
    arrays[1][0] = 1e-6
    assert weights_fingerprint(arrays) != weights_fingerprint([np.ones((3, 3), np.float32), np.zeros(3, np.float32)])


def test_cache_computes_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def fill(outputs: dict[str, np.ndarray]) -> None:
        calls.append(1)
        out = outputs["block5_pool"]
        out[:] = np.arange(out.size, dtype=np.float32).reshape(out.shape)

    cache = FeatureCache(tmp_path, KEY)
    first = cache.get("block5_pool", 4, fill)
    second = FeatureCache(tmp_path, KEY).get("block5_pool", 4, fill)
    assert len(calls) == 1
    assert first.shape == (4, 1, 1, 512)
    assert isinstance(second, np.memmap)
    assert np.array_equal(first, second)
    assert not second.flags.writeable


def test_cache_invalidated_when_key_changes(tmp_path: Path) -> None:
    def fill(value: float) -> object:
        def write(outputs: dict[str, np.ndarray]) -> None:
            outputs["block5_pool"][:] = value

        return write

    FeatureCache(tmp_path, KEY).get("block5_pool", 2, fill(1.0))
    changed = dataclasses.replace(KEY, weights="v" * 64)
    features = FeatureCache(tmp_path, changed).get("block5_pool", 2, fill(2.0))
    assert float(features[0, 0, 0, 0]) == 2.0
    assert [p.name for p in tmp_path.glob("block5_pool-*.npy")] == [f"block5_pool-{changed.digest('block5_pool')}.npy"]


def test_cuts_stored_together_in_one_pass(tmp_path: Path) -> None:
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=4, dropout=0.0, unfreeze_layers=0)
    model = build_model(2, 32, None, params, seed=2)
    images = prepare_images(make_images(6)[0], 32)
    cuts = ["block4_conv2", "block4_pool", "block5_pool"]
    calls: list[list[str]] = []

    def fill(outputs: dict[str, np.ndarray]) -> None:
        calls.append(list(outputs))
        for cut, values in zip(outputs, prefix_model(model, list(outputs)).predict_on_batch(images), strict=True):
            outputs[cut][:] = values

    cache = FeatureCache(tmp_path, KEY, together=cuts)
    stored = cache.get("block5_pool", 6, fill)
    for cut in cuts:
        alone = prefix_model(model, cut).predict_on_batch(images)
        assert np.allclose(cache.get(cut, 6, fill), alone, rtol=1e-5, atol=1e-6), cut
    assert calls == [cuts]
    assert stored.shape == (6, 1, 1, 512)
    assert not list(tmp_path.glob("*.partial.npy"))


@pytest.mark.parametrize("size", [32, 64])
def test_feature_shape_matches_keras(size: int) -> None:
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=4, dropout=0.0, unfreeze_layers=0)
    model = build_model(2, size, None, params)
    for cut in BASE_LAYERS:
        assert tuple(prefix_model(model, cut).output.shape[1:]) == feature_shape(cut, size), cut


def test_cut_layers_of_search_range() -> None:
    config = config_from_dict({"search": {"unfreeze_layers": {"low": 0, "high": 4}}})
    assert cuts_for_config(config) == ["block4_conv2", "block4_pool", "block5_conv1", "block5_conv2", "block5_pool"]
    assert cut_layer(1, 4) == "block5_pool"
    assert cut_layer(2, 13) is None


def test_budget_exceeded_is_rejected() -> None:
    config = config_from_dict({"model": {"input_size": 224}, "search": {"unfreeze_layers": {"low": 0, "high": 13}}, "cache": {"max_gb": 1}})
    message = r"^cache.max_gb must be >= \d+\.\d\d for 5000 images at 224 px with search.unfreeze_layers reaching block1_conv1, but got 1"
    with pytest.raises(SweepError, match=message):
        check_budget(config, 5000)
    check_budget(config_from_dict({"model": {"input_size": 224}, "cache": {"max_gb": 1}}), 100)
    check_budget(config_from_dict({"model": {"input_size": 224}, "cache": {"max_gb": 1}, "train": {"augment": True}}), 5000)


def test_suffix_after_prefix_equals_full_model() -> None:
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=4, dropout=0.0, unfreeze_layers=2)
    model = build_model(2, 32, None, params, seed=3)
    images = prepare_images(make_images(4)[0], 32)
    full = model.predict_on_batch(images)
    for cut in ("block5_pool", "block5_conv1", "block3_pool"):
        staged = suffix_model(model, cut).predict_on_batch(prefix_model(model, cut).predict_on_batch(images))
        assert np.allclose(staged, full, rtol=1e-5, atol=1e-6), cut


def test_cached_training_matches_uncached(tmp_path: Path) -> None:
    images, labels = make_images(48, seed=4)
    prepared = prepare_images(images, 32)
    keras.utils.set_random_seed(0)
    base_weights = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).get_weights()
    config = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 2, "batch_size": 8}, "model": {"weights": "none"}})
    params = HyperParameters(learning_rate=3e-4, decay=1e-3, head_units=16, dropout=0.3, unfreeze_layers=3)
    fold = FoldData(np.arange(36), np.arange(36, 48), labels)
    cache = FeatureCache(tmp_path, KEY)

    def features(cut: str) -> np.ndarray:
        def fill(outputs: dict[str, np.ndarray]) -> None:
            model = build_model(2, 32, base_weights, params)
            outputs[cut][:] = prefix_model(model, cut).predict_on_batch(prepared)

        return cache.get(cut, len(prepared), fill)

    cached = train_fold(config, params, fold, InputSource(lambda: prepared, features), 2, base_weights, seed=11)
    uncached = train_fold(config, params, fold, InputSource(lambda: prepared), 2, base_weights, seed=11)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.npy")) == ["block4_pool", "block5_pool"]
    assert len(cached.epochs) == len(uncached.epochs) == 3
    _assert_same_metrics(cached, uncached)


def test_reused_trainer_matches_fresh_uncached_folds(tmp_path: Path) -> None:
    images, labels = make_images(40, seed=5)
    prepared = prepare_images(images, 32)
    base_weights = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).get_weights()
    config = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 1, "batch_size": 8}, "model": {"weights": "none"}})
    params = HyperParameters(learning_rate=3e-4, decay=0.0, head_units=8, dropout=0.2, unfreeze_layers=1)
    cache = FeatureCache(tmp_path, KEY)

    def features(cut: str) -> np.ndarray:
        def fill(outputs: dict[str, np.ndarray]) -> None:
            outputs[cut][:] = prefix_model(build_model(2, 32, base_weights, params), cut).predict_on_batch(prepared)

        return cache.get(cut, len(prepared), fill)

    folds = [FoldData(np.arange(20, 40), np.arange(20), labels), FoldData(np.arange(20), np.arange(20, 40), labels)]
    cached = FoldTrainer(config, params, InputSource(lambda: prepared, features), 2, base_weights, seed=3)
    uncached = FoldTrainer(config, params, InputSource(lambda: prepared), 2, base_weights, seed=3)
    for index, fold in enumerate(folds):
        _assert_same_metrics(cached.train(fold, seed=index), uncached.train(fold, seed=index))


def _assert_same_metrics(cached: FoldResult, uncached: FoldResult) -> None:
    assert len(cached.epochs) == len(uncached.epochs)
    for a, b in zip(cached.epochs, uncached.epochs, strict=True):
        for metric in ("loss", "accuracy", "balanced_accuracy", "auc"):
            assert a.val[metric] == pytest.approx(b.val[metric], rel=1e-4, abs=1e-5), (a.epoch, metric)
            assert a.train[metric] == pytest.approx(b.train[metric], rel=1e-4, abs=1e-5), (a.epoch, metric)


@pytest.mark.parametrize(
    ("setting", "flags", "gpus", "expected"),
    [
        ("auto", {"avx2", "avx512_bf16"}, [], "mixed_bfloat16"),
        ("auto", {"avx2", "amx_bf16", "amx_tile"}, [], "mixed_bfloat16"),
        ("auto", {"avx2", "avx512f"}, [], "float32"),
        ("auto", set(), [(9, 0)], "mixed_bfloat16"),
        ("auto", {"avx512_bf16"}, [(7, 5)], "float32"),
        ("float32", {"avx512_bf16"}, [], "float32"),
        ("mixed_float16", set(), [], "mixed_float16"),
    ],
)
def test_precision_choice(setting: str, flags: set[str], gpus: list[tuple[int, int]], expected: str) -> None:
    assert choose_precision(setting, flags, gpus) == expected
