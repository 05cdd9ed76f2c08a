"""VGG16 base plus a small dense head, and the freezing of each training phase."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from sweep.config import TrainSection

BASE_NAME = "vgg16"
# Layers of keras.applications.VGG16(include_top=False) below the input, bottom to top.
CONV_LAYERS = tuple(f"block{block}_conv{conv}" for block, count in enumerate((2, 2, 3, 3, 3), start=1) for conv in range(1, count + 1))
BASE_LAYERS = tuple(name for block in range(1, 6) for name in [*(c for c in CONV_LAYERS if c.startswith(f"block{block}_")), f"block{block}_pool"])


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
    seed: int = 0,
    augment: bool = False,
) -> keras.Model:
    """Build a fresh VGG16 (no top) with a dense head; the base is named ``vgg16``.

    Args:
        n_classes: Output units; softmax for two classes too, so binary and
            multi-class share one loss and one metric path.
        input_size: Image side in pixels.
        base_weights: The base's 26 arrays (ImageNet), or None for random initialisation.
        params: The trial's hyperparameters; only the head's are used here.
        pooling: ``avg``, ``max`` or ``flatten`` between the base and the hidden layer.
        seed: Seed of the head's initial weights and dropout masks. Each layer has its own
            seed, so a model cut at any layer starts from the same values.
        augment: Add random flips, rotations and zooms in front of the base (training only).

    Returns:
        An uncompiled model.
    """
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    if base_weights is not None:
        base.set_weights(base_weights)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    images = inputs
    if augment:
        images = keras.layers.RandomFlip("horizontal", seed=seed, name="augment_flip")(images)
        images = keras.layers.RandomRotation(0.05, seed=seed + 1, name="augment_rotation")(images)
        images = keras.layers.RandomZoom(0.1, seed=seed + 2, name="augment_zoom")(images)
    # training=False keeps the base in inference mode whatever its trainable flag.
    features = base(images, training=False)
    pool_layer = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }[pooling]
    hidden = pool_layer(name="pool")(features)
    hidden = keras.layers.Dense(params.head_units, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 3), name="head_dense")(
        hidden
    )
    hidden = keras.layers.Dropout(params.dropout, seed=seed + 4, name="head_dropout")(hidden)
    # The output layer stays float32 even under a mixed-precision policy.
    outputs = keras.layers.Dense(
        n_classes, activation="softmax", dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 5), name="head_output"
    )(hidden)
    return keras.Model(inputs, outputs, name="vgg16_transfer")


def cut_layer(phase: int, unfreeze_layers: int) -> str | None:
    """Return the name of the last frozen base layer, whose output the trainable part takes as input.

    Phase 1, and phase 2 with nothing unfrozen, cut at the base's output
    (``block5_pool``); phase 2 cuts just below the lowest unfrozen convolution.
    None means nothing is frozen (all 13 convolutions train).
    """
    if phase == 1 or unfreeze_layers == 0:
        return BASE_LAYERS[-1]
    first_trainable = BASE_LAYERS.index(CONV_LAYERS[-unfreeze_layers])
    return BASE_LAYERS[first_trainable - 1] if first_trainable > 0 else None


def suffix_model(model: keras.Model, cut: str) -> keras.Model:
    """Return a model from the output of base layer ``cut`` to the class probabilities.

    The suffix shares its layers, and so its weights, with ``model``: training it
    trains the full model, minus the frozen prefix that a feature cache replaces.
    """
    base = model.get_layer(BASE_NAME)
    features = keras.Input(tuple(base.get_layer(cut).output.shape[1:]), name=f"{cut}_features")
    hidden = features
    for layer in base.layers[base.layers.index(base.get_layer(cut)) + 1 :]:
        hidden = layer(hidden)
    for layer in model.layers[model.layers.index(base) + 1 :]:
        hidden = layer(hidden)
    return keras.Model(features, hidden, name=f"suffix_from_{cut}")


def prefix_model(model: keras.Model, cut: str | list[str]) -> keras.Model:
    """Return the frozen part of the base: image to the output of layer ``cut``, or a list of outputs of several layers."""
    base = model.get_layer(BASE_NAME)
    if isinstance(cut, list):
        return keras.Model(base.inputs, [base.get_layer(name).output for name in cut], name="prefix_to_" + "_".join(cut))
    return keras.Model(base.inputs, base.get_layer(cut).output, name=f"prefix_to_{cut}")


@contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under a Keras dtype policy (``float32``, ``mixed_bfloat16``, ``mixed_float16``), then restore the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the base's 13 convolution layers, bottom to top."""
    base = model.get_layer(BASE_NAME)
    return [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)]


def trained_convolutions(phase: int, unfreeze_layers: int) -> tuple[str, ...]:
    """Return the base convolutions a phase trains: none in phase 1, the top ``unfreeze_layers`` in phase 2.

    The head is warmed up first with the whole base frozen, because large
    gradients from a random head would otherwise wreck the pretrained filters.
    The head trains in both phases.
    """
    if phase == 1 or unfreeze_layers == 0:
        return ()
    return CONV_LAYERS[-unfreeze_layers:]


def make_optimizer(
    train: TrainSection, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule, decay: float = 0.0
) -> keras.optimizers.Optimizer:
    """Create the configured optimizer with inverse-time decay: lr / (1 + decay * step).

    ``InverseTimeDecay`` with one decay step per optimizer step is what the
    ``decay`` argument of Keras 2 optimizers did. A schedule passed as
    ``learning_rate`` is used as it is.
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if decay > 0 and not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        rate = keras.optimizers.schedules.InverseTimeDecay(learning_rate, decay_steps=1, decay_rate=decay)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=0.9)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate)
    return keras.optimizers.Adam(learning_rate=rate)


class AdjustableInverseTimeDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Inverse-time decay, lr / (1 + decay * step), whose two values can change between trials.

    The values live in variables, so a traced training step reads the new ones
    without being traced again.
    """

    def __init__(self, learning_rate: float = 1e-3, decay: float = 0.0) -> None:
        self.initial = keras.Variable(learning_rate, dtype="float32", trainable=False, name="initial_learning_rate")
        self.decay = keras.Variable(decay, dtype="float32", trainable=False, name="decay_rate")

    def set(self, learning_rate: float, decay: float) -> None:
        self.initial.assign(learning_rate)
        self.decay.assign(decay)

    def __call__(self, step: Any) -> Any:
        return self.initial / (1.0 + self.decay * keras.ops.cast(step, "float32"))

    def get_config(self) -> dict[str, float]:
        return {"learning_rate": float(keras.ops.convert_to_numpy(self.initial)), "decay": float(keras.ops.convert_to_numpy(self.decay))}


class UnitMask(keras.layers.Layer):
    """Multiplies each hidden unit by 1 or 0, so a wide head computes exactly what a narrower one does.

    A zeroed unit passes nothing forward and receives no gradient, so its weights
    never change. One head as wide as the search range then serves every trial.
    """

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.mask = self.add_weight(shape=(input_shape[-1],), initializer="ones", trainable=False, name="mask")

    def set_units(self, units: int) -> None:
        """Keep the first ``units`` units and zero the rest."""
        values = np.zeros(self.mask.shape, dtype=np.float32)
        values[:units] = 1.0
        self.mask.assign(values)

    def call(self, inputs: Any) -> Any:
        return inputs * keras.ops.cast(self.mask, inputs.dtype)


class AdjustableDropout(keras.layers.Layer):
    """Dropout whose rate lives in a variable, so it can change without tracing the model again.

    Args:
        seed: Seed of the dropout masks; :meth:`reseed` restarts the sequence.
    """

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        # The rate stays float32 under a mixed-precision policy, where the inputs are not.
        self.rate = self.add_weight(shape=(), initializer="zeros", trainable=False, autocast=False, name="rate")

    def reseed(self, seed: int) -> None:
        """Restart the mask sequence as a layer created with ``seed`` would."""
        self.seed_generator.state.assign(np.array([seed, 0]).astype(self.seed_generator.state.dtype))

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training:
            return inputs
        keep = keras.random.uniform(keras.ops.shape(inputs), seed=self.seed_generator) >= self.rate
        scale = keras.ops.cast(keep, "float32") / (1.0 - self.rate)
        return inputs * keras.ops.cast(scale, inputs.dtype)
