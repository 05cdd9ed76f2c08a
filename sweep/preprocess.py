"""The one preprocessing path of every image: channels, size, then VGG16's own normalisation.

Training, validation, refits and predictions all call :func:`prepare_images`, so a
model never receives inputs prepared differently from those it was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

PREPROCESSING = "keras.applications.vgg16.preprocess_input"
CHUNK = 512


def prepare_images(images: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
    """Turn raw images into VGG16 inputs.

    Grayscale images are copied to three channels, every image is resized to
    ``size`` x ``size`` (bilinear, antialiased), and the batch goes through
    ``keras.applications.vgg16.preprocess_input`` (RGB to BGR, ImageNet mean
    subtracted), which expects pixel values in 0-255. Floating-point images whose
    values all lie in [0, 1] are scaled by 255 first, with a log message.

    Args:
        images: An (N, H, W) or (N, H, W, C) array, or a sequence of (H, W[, C]) arrays of any sizes.
        size: Output side in pixels.

    Returns:
        A float32 array of shape (N, size, size, 3).
    """
    from keras.applications import vgg16

    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    if len(images) == 0:
        return out
    scale = _intensity_scale(images)
    if isinstance(images, np.ndarray):
        for start in range(0, len(images), CHUNK):
            out[start : start + CHUNK] = _resize(_to_rgb(images[start : start + CHUNK]), size)
    else:
        for index, image in enumerate(images):
            out[index] = _resize(_to_rgb(image[None]), size)[0]
    if scale != 1.0:
        out *= scale
    return np.asarray(vgg16.preprocess_input(out), dtype=np.float32)


def _intensity_scale(images: np.ndarray | Sequence[np.ndarray]) -> float:
    sample = images if isinstance(images, np.ndarray) else np.concatenate([np.ravel(i) for i in images])
    if np.issubdtype(sample.dtype, np.floating) and sample.size and float(sample.min()) >= 0.0 and float(sample.max()) <= 1.0:
        logger.warning("images are floats in [0, 1]; scaling them by 255 to the 0-255 range VGG16 preprocessing expects")
        return 255.0
    return 1.0


def _to_rgb(batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim == 3:
        batch = batch[..., None]
    channels = batch.shape[-1]
    if channels == 1:
        # VGG16's first layer has RGB filters; a grey image is the same intensity in all three.
        return np.repeat(batch, 3, axis=-1)
    if channels == 4:
        return batch[..., :3]
    if channels != 3:
        raise ValueError(f"images must have 1, 3 or 4 channels, but got {channels}")
    return batch


def _resize(batch: np.ndarray, size: int) -> np.ndarray:
    if batch.shape[1] == size and batch.shape[2] == size:
        return batch
    import tensorflow as tf

    return np.asarray(tf.image.resize(batch, (size, size), method="bilinear", antialias=True))
