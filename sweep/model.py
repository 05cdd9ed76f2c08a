"""VGG16 base plus a small dense head, and the freezing of each training phase."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from sweep.config import TrainSection

BASE_NAME = "vgg16"


@dataclass(frozen=True)
class HyperParameters:
    """The five values a trial samples."""

    learning_rate: float  # phase 2 initial learning rate
    decay: float  # inverse-time decay rate per optimizer step
    head_units: int  # units of the hidden dense layer
    dropout: float  # dropout rate after the hidden layer
    unfreeze_layers: int  # convolution layers trained in phase 2, counted from the top


def build_model(
    n_classes: int,
    input_size: int,
    base_weights: list[np.ndarray] | None,
    params: HyperParameters,
    pooling: str = "avg",
) -> keras.Model:
    """Build a fresh VGG16 (no top) with a dense head; the base is named ``vgg16``.

    Args:
        n_classes: Output units; softmax for two classes too, so binary and
            multi-class share one loss and one metric path.
        input_size: Image side in pixels.
        base_weights: The base's 26 arrays (ImageNet), or None for random initialisation.
        params: The trial's hyperparameters; only the head's are used here.
        pooling: ``avg``, ``max`` or ``flatten`` between the base and the hidden layer.

    Returns:
        An uncompiled model.
    """
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    if base_weights is not None:
        base.set_weights(base_weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    # training=False keeps the base in inference mode whatever its trainable flag.
    features = base(inputs, training=False)
    pool_layer = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }[pooling]
    hidden = pool_layer(name="pool")(features)
    hidden = keras.layers.Dense(params.head_units, activation="relu", name="head_dense")(hidden)
    hidden = keras.layers.Dropout(params.dropout, name="head_dropout")(hidden)
    # The output layer stays float32 even under a mixed-precision policy.
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="head_output")(hidden)
    return keras.Model(inputs, outputs, name="vgg16_transfer")


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the base's 13 convolution layers, bottom to top."""
    base = model.get_layer(BASE_NAME)
    return [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]


def freeze_for_phase(model: keras.Model, phase: int, unfreeze_layers: int) -> None:
    """Set which layers train: phase 1 the head alone, phase 2 also the top ``unfreeze_layers`` convolutions.

    The head is warmed up first with the whole base frozen, because large
    gradients from a random head would otherwise wreck the pretrained filters.
    The caller must compile the model again after this call.
    """
    base = model.get_layer(BASE_NAME)
    if phase == 1 or unfreeze_layers == 0:
        base.trainable = False
        return
    base.trainable = True
    trainable = set(id(layer) for layer in conv_layers(model)[-unfreeze_layers:])
    for layer in base.layers:
        layer.trainable = id(layer) in trainable


def trainable_layer_names(model: keras.Model) -> list[str]:
    """Return the names of the layers with trainable weights, base layers included."""
    names: list[str] = []
    for layer in model.layers:
        if layer.name == BASE_NAME:
            names.extend(inner.name for inner in layer.layers if inner.trainable_weights)
        elif layer.trainable_weights:
            names.append(layer.name)
    return names


def make_optimizer(train: TrainSection, learning_rate: float, decay: float = 0.0) -> keras.optimizers.Optimizer:
    """Create the configured optimizer with inverse-time decay: lr / (1 + decay * step).

    ``InverseTimeDecay`` with one decay step per optimizer step is what the
    ``decay`` argument of Keras 2 optimizers did.
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if decay > 0:
        rate = keras.optimizers.schedules.InverseTimeDecay(learning_rate, decay_steps=1, decay_rate=decay)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=0.9)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate)
    return keras.optimizers.Adam(learning_rate=rate)
