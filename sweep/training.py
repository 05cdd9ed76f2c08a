"""Training of one fold: head warm-up, then fine-tuning of the top layers, with per-epoch metrics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from sweep.config import Config
from sweep.metrics import classification_metrics
from sweep.model import HyperParameters, build_model, cut_layer, dtype_policy, freeze_for_phase, make_optimizer, suffix_model

logger = logging.getLogger(__name__)

PREDICT_BATCH = 256


@dataclass(frozen=True)
class EpochResult:
    """Metrics after one epoch; ``epoch`` counts both phases from 1."""

    epoch: int
    phase: int
    learning_rate: float
    duration_s: float
    train: dict[str, float]
    val: dict[str, float]

    def row(self) -> dict[str, float | int]:
        """Return the values as columns of the sweep_epochs table."""
        values: dict[str, float | int] = {
            "epoch": self.epoch,
            "phase": self.phase,
            "learning_rate": self.learning_rate,
            "duration_s": self.duration_s,
        }
        values.update({f"train_{k}": v for k, v in self.train.items()})
        values.update({f"val_{k}": v for k, v in self.val.items()})
        return values


@dataclass
class FoldResult:
    """All epochs of one fold and the final metrics."""

    epochs: list[EpochResult] = field(default_factory=list)
    duration_s: float = 0.0
    diverged: bool = False
    val_probabilities: np.ndarray | None = None  # predictions on the validation images after the last epoch
    stopped_early: bool = False

    @property
    def final(self) -> EpochResult:
        return self.epochs[-1]

    def best_epoch(self, objective: str) -> int:
        """Return the phase 2 epoch (1-based within phase 2) with the best validation objective."""
        phase2 = [e for e in self.epochs if e.phase == 2]
        if not phase2:
            return 0
        # Non-finite values count as the worst possible score.
        worst = math.inf if objective == "loss" else -math.inf
        values = [e.val[objective] if math.isfinite(e.val[objective]) else worst for e in phase2]
        if objective == "loss":
            return int(np.argmin(values)) + 1
        return int(np.argmax(values)) + 1


@dataclass(frozen=True)
class FoldData:
    """Indices of one fold into the study's samples, and every sample's label."""

    train_index: np.ndarray
    val_index: np.ndarray
    labels: np.ndarray


class InputSource:
    """What a model reads for a given cut: stored features of a frozen prefix, or prepared images.

    Args:
        images: Returns the prepared images of all samples; called only when needed.
        features: Returns the stored features of all samples for a cut layer. It is
            None when the cache is off, and is called only for cuts with a frozen prefix.
    """

    def __init__(self, images: Callable[[], np.ndarray], features: Callable[[str], np.ndarray] | None = None) -> None:
        self._images = images
        self._features = features

    @property
    def cached(self) -> bool:
        return self._features is not None

    def inputs(self, cut: str | None) -> np.ndarray:
        """Return the array a model cut at ``cut`` takes: features when cached, else images."""
        if cut is None or self._features is None:
            return self._images()
        return self._features(cut)


def predict_proba(model: keras.Model, inputs: np.ndarray, index: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Return class probabilities of ``inputs[index]``, batch by batch in inference mode."""
    if len(index) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    parts = []
    for start in range(0, len(index), batch_size):
        batch = np.asarray(inputs[index[start : start + batch_size]], dtype=np.float32)
        parts.append(np.asarray(model.predict_on_batch(batch), dtype=np.float32))
    return np.concatenate(parts)


def batches(inputs: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Return a prefetching tf.data pipeline of ``(inputs[i], labels[i])`` batches in the given order.

    Rows are gathered batch by batch, so a memory-mapped feature file is read
    from disk as training goes instead of being copied into memory whole.
    """
    shape = inputs.shape[1:]

    def gather(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(inputs[index], dtype=np.float32), labels[index].astype(np.int64)

    def load(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [index], (tf.float32, tf.int64))
        x.set_shape((None, *shape))
        y.set_shape((None,))
        return x, y

    dataset = tf.data.Dataset.from_tensor_slices(order.astype(np.int64)).batch(batch_size).map(load)
    return dataset.prefetch(tf.data.AUTOTUNE)


class FoldTrainer:
    """Trains one trial's configuration on fold after fold, reusing its models.

    The model is built once per trial and its initial weights are restored
    before every fold, so each fold starts from the same state. Models trained
    on cached features are compiled once per phase and only have their optimizer
    state cleared between folds: compiling traces new TensorFlow functions, which
    costs more than the training itself on small inputs. The uncached path
    compiles the whole network for every phase of every fold, as a hand-written
    Keras loop does.

    Args:
        config: The study configuration (model and training sections).
        params: The trial's hyperparameters.
        source: Where inputs come from for each cut.
        n_classes: Number of classes.
        base_weights: VGG16 base weights, or None for random initialisation.
        seed: Seed of the head initialisation and dropout.
        precision: Keras dtype policy of the model.
    """

    def __init__(
        self,
        config: Config,
        params: HyperParameters,
        source: InputSource,
        n_classes: int,
        base_weights: list[np.ndarray] | None,
        seed: int,
        precision: str = "float32",
    ) -> None:
        self.config = config
        self.params = params
        self.source = source
        self.precision = precision
        keras.utils.set_random_seed(seed)
        with dtype_policy(precision):
            self.model = build_model(n_classes, config.model.input_size, base_weights, params, config.model.pooling, seed=seed, augment=config.train.augment)
        self.initial_weights = self.model.get_weights()
        self.compiled: dict[int, keras.Model] = {}

    def train(self, fold: FoldData, seed: int, on_epoch: Callable[[EpochResult], None] | None = None) -> FoldResult:
        """Train on one fold in two phases and score every epoch.

        Args:
            fold: The fold's training and validation indices and all labels.
            seed: Seed of this fold's batch order.
            on_epoch: Called with each epoch's result as soon as it is scored.

        Returns:
            The fold's epochs. Training stops early when the loss becomes NaN or infinite.
        """
        started = time.perf_counter()
        self.model.set_weights(self.initial_weights)
        order_rng = np.random.default_rng(seed)
        result = FoldResult()
        config, params = self.config, self.params
        phases = ((1, config.train.warmup_epochs, config.train.warmup_learning_rate, 0.0), (2, config.train.epochs, params.learning_rate, params.decay))
        # The policy stays set while training so that models cut from the full one
        # compile as mixed precision too (mixed_float16 then gets loss scaling).
        with dtype_policy(self.precision):
            for phase, epochs, learning_rate, decay in phases:
                if epochs == 0:
                    continue
                freeze_for_phase(self.model, phase, params.unfreeze_layers)
                trained, inputs = self._phase_model(phase, learning_rate, decay)
                if self._run_phase(trained, inputs, fold, phase, epochs, order_rng, result, on_epoch):
                    break
        result.duration_s = time.perf_counter() - started
        return result

    def _phase_model(self, phase: int, learning_rate: float, decay: float) -> tuple[keras.Model, np.ndarray]:
        cut = None if self.config.train.augment else cut_layer(phase, self.params.unfreeze_layers)
        inputs = self.source.inputs(cut)
        if cut is None or not self.source.cached:
            self.model.compile(optimizer=make_optimizer(self.config.train, learning_rate, decay), loss="sparse_categorical_crossentropy")
            return self.model, inputs
        trained = self.compiled.get(phase)
        if trained is None:
            trained = suffix_model(self.model, cut)
            trained.compile(optimizer=make_optimizer(self.config.train, learning_rate, decay), loss="sparse_categorical_crossentropy")
            self.compiled[phase] = trained
        elif trained.optimizer.built:
            _reset_optimizer(trained.optimizer)
        return trained, inputs

    def _run_phase(
        self,
        trained: keras.Model,
        inputs: np.ndarray,
        fold: FoldData,
        phase: int,
        epochs: int,
        order_rng: np.random.Generator,
        result: FoldResult,
        on_epoch: Callable[[EpochResult], None] | None,
    ) -> bool:
        """Train one phase; return True when the loss diverged and the fold must stop."""
        stopping = self.config.train.early_stopping if phase == 2 else None
        best, waited = math.inf, 0
        for _ in range(epochs):
            epoch_started = time.perf_counter()
            order = order_rng.permutation(fold.train_index)
            history = trained.fit(batches(inputs, fold.labels, order, self.config.train.batch_size), epochs=1, shuffle=False, verbose=0)
            loss = history.history["loss"][-1]
            epoch, result.val_probabilities = _score_epoch(trained, inputs, fold, phase, len(result.epochs) + 1, time.perf_counter() - epoch_started)
            result.epochs.append(epoch)
            if on_epoch is not None:
                on_epoch(epoch)
            if not math.isfinite(loss) or not np.isfinite(result.val_probabilities).all():
                logger.warning("training loss became %s in phase %d; the fold stops here", loss, phase)
                result.diverged = True
                return True
            if stopping is not None:
                value = _monitored(epoch, stopping.monitor)
                if value < best:
                    best, waited = value, 0
                else:
                    waited += 1
                if waited >= stopping.patience:
                    result.stopped_early = True
                    break
        return False


def train_fold(
    config: Config,
    params: HyperParameters,
    fold: FoldData,
    source: InputSource,
    n_classes: int,
    base_weights: list[np.ndarray] | None,
    seed: int,
    precision: str = "float32",
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> FoldResult:
    """Train a fresh model on one fold; see :class:`FoldTrainer` for the arguments."""
    return FoldTrainer(config, params, source, n_classes, base_weights, seed, precision).train(fold, seed, on_epoch)


def _reset_optimizer(optimizer: keras.optimizers.Optimizer) -> None:
    """Zero the step counter and the moment estimates, as in a newly created optimizer."""
    for variable in optimizer.variables:
        name = variable.path.rsplit("/", 1)[-1]
        if name == "iteration" or name.endswith(("_momentum", "_velocity")):
            variable.assign(keras.ops.zeros(variable.shape, dtype=variable.dtype))


def _score_epoch(model: keras.Model, inputs: np.ndarray, fold: FoldData, phase: int, number: int, duration_s: float) -> tuple[EpochResult, np.ndarray]:
    val_probabilities = predict_proba(model, inputs, fold.val_index)
    epoch = EpochResult(
        epoch=number,
        phase=phase,
        learning_rate=float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
        duration_s=duration_s,
        train=classification_metrics(fold.labels[fold.train_index], predict_proba(model, inputs, fold.train_index)),
        val=_metrics_or_nan(fold.labels[fold.val_index], val_probabilities),
    )
    return epoch, val_probabilities


def _metrics_or_nan(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    # A refit on all data has no validation images; its validation metrics are NaN.
    if len(labels) == 0:
        return dict.fromkeys(("loss", "accuracy", "balanced_accuracy", "auc"), math.nan)
    return classification_metrics(labels, probabilities)


def _monitored(epoch: EpochResult, monitor: str) -> float:
    """Return the monitored metric as a value to minimise (accuracy-like metrics are negated)."""
    split, _, metric = monitor.partition("_") if monitor.startswith("val_") else ("train", "", monitor)
    value = (epoch.val if split == "val" else epoch.train)[metric]
    if not math.isfinite(value):
        return math.inf
    return value if metric == "loss" else -value
