"""The network a worker trains: VGG16 layers and one padded head, shared by a model per cut and reused across trials.

Tracing a TensorFlow function for a new Keras model costs seconds, more than
a whole fold of training above a high cut on small images. So a worker builds
its layers once. The head is as wide as the widest ``head_units`` the search
can sample, with a mask that zeroes the units a trial does not use. The
learning rate, decay and dropout rate live in variables. A trial then only
assigns new values: initial weights, mask, rate and schedule. The model and
traced training step of each cut serve every later trial with that cut.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from sweep.config import TrainSection
from sweep.features import feature_shape
from sweep.model import (
    BASE_LAYERS,
    CONV_LAYERS,
    AdjustableDropout,
    AdjustableInverseTimeDecay,
    HyperParameters,
    UnitMask,
    build_model,
    cut_layer,
    dtype_policy,
    make_optimizer,
    trained_convolutions,
)

TrainStep = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
PredictStep = Callable[[tf.Tensor], tf.Tensor]


class HeadStart:
    """A trial's initial head: the weights, as wide as the network's head, with the trial's units filled in.

    The values are those :func:`sweep.model.build_model` draws for a head of
    exactly ``units`` units with the same seed, so the padded head starts where
    the narrow one would.
    """

    def __init__(self, params: HyperParameters, seed: int, fan_in: int, width: int, n_classes: int) -> None:
        units = params.head_units
        if units > width:
            raise ValueError(f"head_units {units} exceeds the network's head width {width}")
        self.units = units
        self.dropout = params.dropout
        self.seed = seed
        self.dense_kernel = np.zeros((fan_in, width), dtype=np.float32)
        self.dense_kernel[:, :units] = keras.ops.convert_to_numpy(keras.initializers.GlorotUniform(seed=seed + 3)((fan_in, units)))
        self.output_kernel = np.zeros((width, n_classes), dtype=np.float32)
        self.output_kernel[:units] = keras.ops.convert_to_numpy(keras.initializers.GlorotUniform(seed=seed + 5)((units, n_classes)))


class Network:
    """VGG16 layers, a padded head and one optimizer, from which a model per cut is made.

    Args:
        n_classes: Output units.
        input_size: Image side in pixels.
        base_weights: VGG16 base weights, or None for random initialisation.
        train: The training section (optimizer).
        pooling: ``avg``, ``max`` or ``flatten`` between the base and the head.
        precision: Keras dtype policy of every layer.
        head_width: Units of the hidden dense layer: the widest head a trial may ask for.
        max_unfreeze: The maximum number of convolutions, counted from the top, that a trial may train.
        augment: Put random flips, rotations and zooms in front of the image model.
    """

    def __init__(
        self,
        n_classes: int,
        input_size: int,
        base_weights: list[np.ndarray] | None,
        train: TrainSection,
        pooling: str,
        precision: str,
        head_width: int,
        max_unfreeze: int,
        augment: bool = False,
    ) -> None:
        self.n_classes = n_classes
        self.input_size = input_size
        self.pooling = pooling
        self.precision = precision
        self.head_width = head_width
        with dtype_policy(precision):
            base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
            if base_weights is not None:
                base.set_weights(base_weights)
            self.base_layers = {layer.name: layer for layer in base.layers[1:]}
            self.augment: list[keras.layers.Layer] = []
            if augment:
                self.augment = [
                    keras.layers.RandomFlip("horizontal", name="augment_flip"),
                    keras.layers.RandomRotation(0.05, name="augment_rotation"),
                    keras.layers.RandomZoom(0.1, name="augment_zoom"),
                ]
            pool_layer = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D, "flatten": keras.layers.Flatten}[pooling]
            self.pool = pool_layer(name="pool")
            self.head_dense = keras.layers.Dense(head_width, activation="relu", kernel_initializer="zeros", name="head_dense")
            self.head_mask = UnitMask(name="head_mask")
            self.head_dropout = AdjustableDropout(name="head_dropout")
            # The output layer stays float32 even under a mixed-precision policy.
            self.head_output = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="head_output")
            self.schedule = AdjustableInverseTimeDecay()
            self.optimizer = make_optimizer(train, self.schedule)
            self.fused_adam = train.fused_adam and is_plain_adam(self.optimizer)
            if precision == "mixed_float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
        self.models: dict[str | None, keras.Model] = {}
        # Building the model above the base's output creates the head's weights.
        self.model(BASE_LAYERS[-1])
        self.fan_in = int(self.head_dense.kernel.shape[0])
        self.trainable_convs = CONV_LAYERS[len(CONV_LAYERS) - max_unfreeze :] if max_unfreeze > 0 else ()
        self.start_weights = {name: [np.asarray(w) for w in self.base_layers[name].get_weights()] for name in self.trainable_convs}
        with dtype_policy(precision):
            self.optimizer.build(self.variables(self.trainable_convs))
        self.steps: dict[tuple[str | None, tuple[str, ...]], tuple[TrainStep, PredictStep]] = {}

    def model(self, cut: str | None) -> keras.Model:
        """Return the model from the output of base layer ``cut`` (None: from the image) to the class probabilities."""
        if cut not in self.models:
            with dtype_policy(self.precision):
                if cut is None:
                    inputs = keras.Input((self.input_size, self.input_size, 3), name="image")
                    hidden = inputs
                    for layer in self.augment:
                        hidden = layer(hidden)
                    above = list(self.base_layers.values())
                else:
                    inputs = keras.Input(feature_shape(cut, self.input_size), name=f"{cut}_features")
                    hidden = inputs
                    above = [self.base_layers[name] for name in BASE_LAYERS[BASE_LAYERS.index(cut) + 1 :]]
                for layer in [*above, self.pool, self.head_dense, self.head_mask, self.head_dropout, self.head_output]:
                    hidden = layer(hidden)
                self.models[cut] = keras.Model(inputs, hidden, name=f"from_{cut or 'image'}")
        return self.models[cut]

    def variables(self, convolutions: tuple[str, ...]) -> list[keras.Variable]:
        """Return the trainable variables of the given base convolutions and of the head."""
        layers = [self.base_layers[name] for name in convolutions] + [self.head_dense, self.head_output]
        return [variable for layer in layers for variable in layer.trainable_weights]

    def head_start(self, params: HyperParameters, seed: int) -> HeadStart:
        """Return the initial head of a trial with these hyperparameters and seed."""
        return HeadStart(params, seed, self.fan_in, self.head_width, self.n_classes)

    def restart(self, head: HeadStart) -> None:
        """Put every weight a trial can train back to its start, and set the head's units, dropout rate and mask seed."""
        for name, weights in self.start_weights.items():
            self.base_layers[name].set_weights(weights)
        self.head_dense.set_weights([head.dense_kernel, np.zeros(self.head_width, dtype=np.float32)])
        self.head_output.set_weights([head.output_kernel, np.zeros(self.n_classes, dtype=np.float32)])
        self.head_mask.set_units(head.units)
        self.head_dropout.rate.assign(head.dropout)
        self.head_dropout.reseed(head.seed + 4)

    def start_phase(self, learning_rate: float, decay: float) -> None:
        """Give the optimizer a fresh state, as a newly created one has, with this phase's schedule."""
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer.dynamic_scale.assign(optimizer.initial_scale)
            optimizer.step_counter.assign(0)
            optimizer = optimizer.inner_optimizer
        for variable in optimizer.variables:
            variable.assign(keras.ops.zeros(variable.shape, dtype=variable.dtype))
        self.schedule.set(learning_rate, decay)

    @property
    def learning_rate(self) -> float:
        """The learning rate the optimizer's next step uses."""
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    def step_functions(self, cut: str | None, convolutions: tuple[str, ...], keep: bool) -> tuple[TrainStep, PredictStep]:
        """Return traced training and prediction steps of the model above ``cut`` that train ``convolutions`` and the head.

        With ``keep`` the functions are stored and returned again for the same
        cut and convolutions, in this and every later trial. Without it they
        are traced anew, as compiling a Keras model does.
        """
        key = (cut, convolutions)
        if keep and key in self.steps:
            return self.steps[key]
        unknown = set(convolutions) - set(self.trainable_convs)
        if unknown:
            raise ValueError(f"convolutions {sorted(unknown)} are not among the {len(self.trainable_convs)} this network can train")
        functions = _trace(self.model(cut), self.variables(convolutions), self.optimizer, self.fused_adam)
        if keep:
            self.steps[key] = functions
        return functions

    def prepare(self, unfreeze_range: range, batch_size: int) -> None:
        """Trace and run once the steps of every cut a trial may train above, before the first trial.

        The first run of a traced step allocates memory that stays for the life
        of the process. With every cut paid for up front, the memory after the
        worker's first trial already includes all of them, so later growth points
        to a leak. The weights and optimizer state this changes are reset when a
        trial starts.
        """
        pairs = [(BASE_LAYERS[-1], ())] + [(cut_layer(2, n), trained_convolutions(2, n)) for n in unfreeze_range]
        for cut, convolutions in dict.fromkeys(pairs):
            train_step, predict_step = self.step_functions(cut, convolutions, keep=True)
            shape = tuple(self.model(cut).inputs[0].shape[1:])
            inputs = tf.zeros((batch_size, *shape), tf.float32)
            train_step(inputs, tf.zeros((batch_size,), tf.int64))[0].numpy()
            predict_step(inputs).numpy()

    def export(self, params: HyperParameters) -> keras.Model:
        """Return a plain model (see :func:`sweep.model.build_model`) with the trial's exact head width and the current weights."""
        units = params.head_units
        with dtype_policy(self.precision):
            model = build_model(self.n_classes, self.input_size, None, params, self.pooling)
        base = model.get_layer("vgg16")
        for name, layer in self.base_layers.items():
            base.get_layer(name).set_weights(layer.get_weights())
        kernel, bias = self.head_dense.get_weights()
        model.get_layer("head_dense").set_weights([kernel[:, :units], bias[:units]])
        kernel, bias = self.head_output.get_weights()
        model.get_layer("head_output").set_weights([kernel[:units], bias])
        return model


def _trace(model: keras.Model, variables: list[keras.Variable], optimizer: keras.optimizers.Optimizer, fused: bool) -> tuple[TrainStep, PredictStep]:
    """Trace one training step (returning the batch loss and probabilities) and one prediction step of ``model``.

    With ``fused``, the step applies the optimizer, a plain Adam, with :func:`apply_adam`.
    """
    shape = tuple(model.inputs[0].shape[1:])
    loss_function = keras.losses.SparseCategoricalCrossentropy()

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64)])
    def train_step(inputs: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            probabilities = model(inputs, training=True)
            loss = loss_function(labels, probabilities)
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)
        if fused:
            apply_adam(optimizer, gradients, variables)
        else:
            optimizer.apply(gradients, variables)
        return loss, probabilities

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.float32)])
    def predict_step(inputs: tf.Tensor) -> tf.Tensor:
        return model(inputs, training=False)

    return train_step, predict_step


def is_plain_adam(optimizer: keras.optimizers.Optimizer) -> bool:
    """Return whether ``optimizer`` is an Adam with none of the options that :func:`apply_adam` leaves out."""
    return (
        type(optimizer) is keras.optimizers.Adam
        and not optimizer.amsgrad
        and optimizer.weight_decay is None
        and optimizer.clipnorm is None
        and optimizer.clipvalue is None
        and optimizer.global_clipnorm is None
        and not optimizer.use_ema
        and not optimizer.gradient_accumulation_steps
        and optimizer.loss_scale_factor is None
    )


def apply_adam(optimizer: keras.optimizers.Adam, gradients: list[tf.Tensor], variables: list[keras.Variable]) -> None:
    """Apply one Adam step with TensorFlow's fused ``ResourceApplyAdam`` kernel, one call per variable.

    The update is the one ``keras.optimizers.Adam.update_step`` computes (Keras
    3.15), on the same moment variables and step counter, up to float rounding.
    Keras runs it as separate element-wise operations, each a pass over memory.
    On a 2-core Xeon, the step over the 13.1 million weights above
    ``block3_pool`` took 8 ms fused against 23 ms.
    """
    step = tf.cast(optimizer.iterations + 1, tf.float32)
    learning_rate = tf.cast(optimizer.learning_rate, tf.float32)
    beta_1 = tf.constant(optimizer.beta_1, tf.float32)
    beta_2 = tf.constant(optimizer.beta_2, tf.float32)
    for gradient, variable in zip(gradients, variables, strict=True):
        # The optimizer's private slot lists are where Keras keeps Adam's first and second moments.
        index = optimizer._get_variable_index(variable)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyAdam(
            var=variable.value.handle,
            m=optimizer._momentums[index].value.handle,
            v=optimizer._velocities[index].value.handle,
            beta1_power=tf.cast(tf.pow(beta_1, step), dtype),
            beta2_power=tf.cast(tf.pow(beta_2, step), dtype),
            lr=tf.cast(learning_rate, dtype),
            beta1=tf.cast(beta_1, dtype),
            beta2=tf.cast(beta_2, dtype),
            epsilon=tf.cast(optimizer.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )
    optimizer.iterations.assign_add(1)
