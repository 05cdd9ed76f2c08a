"""Predictions of a saved final model on image files, folders and .npy arrays."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from sweep.data import IMAGE_SUFFIXES, read_image
from sweep.errors import SweepError
from sweep.final import MODEL_FILE, read_preprocessing
from sweep.preprocess import prepare_images
from sweep.training import predict_proba

logger = logging.getLogger(__name__)


def collect_inputs(paths: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """Expand files, folders (searched recursively for PNG and JPEG) and .npy arrays into named images.

    A ``.npy`` file contains one image (H, W[, C]) or a stack (N, H, W[, C]); each
    image of a stack is named ``file.npy[i]``.
    """
    names: list[str] = []
    images: list[np.ndarray] = []
    for argument in paths:
        path = Path(argument)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SweepError(f"folder '{path}' contains no .png, .jpg or .jpeg images")
            for file in files:
                names.append(str(file))
                images.append(read_image(file))
        elif path.suffix.lower() == ".npy":
            names_and_images = _npy_images(path)
            names.extend(n for n, _ in names_and_images)
            images.extend(i for _, i in names_and_images)
        elif path.is_file():
            names.append(str(path))
            images.append(read_image(path))
        else:
            raise SweepError(f"image input not found: '{path}'")
    return names, images


def predict_files(model_dir: Path, paths: list[str], output: TextIO | None = None) -> list[dict[str, object]]:
    """Predict every input image and write one CSV row per image: name, class probabilities, predicted class."""
    import keras

    spec = read_preprocessing(model_dir)
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file():
        raise SweepError(f"model folder '{model_dir}' must contain {MODEL_FILE}, written by `sweep train`")
    class_names = [str(c) for c in spec["class_names"]]  # type: ignore[attr-defined]
    names, images = collect_inputs(paths)
    model = keras.models.load_model(model_path)
    probabilities = predict_proba(model, prepare_images(images, int(spec["input_size"])), np.arange(len(images)))  # type: ignore[call-overload]
    rows: list[dict[str, object]] = []
    for name, row in zip(names, probabilities, strict=True):
        record: dict[str, object] = {"image": name}
        record.update({f"p_{c}": round(float(p), 6) for c, p in zip(class_names, row, strict=True)})
        record["predicted"] = class_names[int(row.argmax())]
        rows.append(record)
    writer = csv.DictWriter(output or sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return rows


def _npy_images(path: Path) -> list[tuple[str, np.ndarray]]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SweepError(f"image input '{path}' is not a readable .npy array: {err}") from err
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] > 4):
        return [(str(path), array)]
    if array.ndim in (3, 4):
        return [(f"{path}[{i}]", image) for i, image in enumerate(array)]
    raise SweepError(f"image input '{path}' must be an image (H, W[, C]) or a stack (N, H, W[, C]), but has shape {array.shape}")
