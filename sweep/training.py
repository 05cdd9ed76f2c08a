"""Training of one fold: head warm-up, then fine-tuning of the top layers, with per-epoch metrics."""

from __future__ import annotations

import logging
import math
import mmap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from sweep.config import Config
from sweep.metrics import classification_metrics
from sweep.model import HyperParameters, cut_layer, trained_convolutions
from sweep.network import Network, PredictStep, TrainStep

logger = logging.getLogger(__name__)

PREDICT_BATCH = 256
# Batches a pipeline prepares ahead of the training step.
PREFETCH_BATCHES = 2


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
        self._feeders: dict[str | None, BatchFeeder] = {}

    @property
    def cached(self) -> bool:
        return self._features is not None

    def inputs(self, cut: str | None) -> np.ndarray:
        """Return the array a model cut at ``cut`` takes: features when cached, else images."""
        if cut is None or self._features is None:
            return self._images()
        return self._features(cut)

    def feeder(self, cut: str | None) -> BatchFeeder:
        """Return the batch pipeline over :meth:`inputs` of ``cut``, built on first use."""
        key = cut if self._features is not None else None
        if key not in self._feeders:
            self._feeders[key] = BatchFeeder(self.inputs(cut))
        return self._feeders[key]

    def release_pages(self) -> None:
        """Drop the pages of memory-mapped feature files from this process's resident memory.

        The files stay in the kernel's page cache, so the next trial reads them
        back without going to disk. Without this, resident memory grows with
        every cut a worker's trials have read, though nothing leaks.
        """
        for feeder in self._feeders.values():
            mapping = feeder.inputs.base if isinstance(feeder.inputs, np.memmap) else None
            if isinstance(mapping, mmap.mmap):
                mapping.madvise(mmap.MADV_DONTNEED)


def predict_proba(model: keras.Model, inputs: np.ndarray, index: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Return class probabilities of ``inputs[index]``, batch by batch in inference mode."""
    if len(index) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    parts = []
    for start in range(0, len(index), batch_size):
        batch = np.asarray(inputs[index[start : start + batch_size]], dtype=np.float32)
        parts.append(np.asarray(model.predict_on_batch(batch), dtype=np.float32))
    return np.concatenate(parts)


class BatchFeeder:
    """A prefetching tf.data pipeline over one input array, built once and given a new order each epoch.

    Rows are gathered batch by batch, so a memory-mapped feature file is read
    from disk as training goes instead of being copied into memory whole.
    The gather runs in Python. TensorFlow keeps every Python function a
    pipeline registers for the life of the process, so a worker that built a
    new pipeline for every epoch grew from trial to trial. One pipeline per
    array, reused, does not.

    The buffer has room for two batches and tf.data's autotuning is off. With
    autotuning on (TensorFlow 2.21, 2-core Xeon), about one epoch in three
    over stored features stalled: its steps took 2.5 s, yet the epoch ended
    only after 5.1 s.
    """

    def __init__(self, inputs: np.ndarray) -> None:
        self.inputs = inputs
        self._order = np.zeros(0, dtype=np.int64)
        self._labels = np.zeros(0, dtype=np.int64)
        self._batch_size = 1
        signature = (tf.TensorSpec((None, *inputs.shape[1:]), tf.float32), tf.TensorSpec((None,), tf.int64))
        options = tf.data.Options()
        options.autotune.enabled = False
        self.dataset = tf.data.Dataset.from_generator(self._generate, output_signature=signature).prefetch(PREFETCH_BATCHES).with_options(options)

    def epoch(self, labels: np.ndarray, order: np.ndarray, batch_size: int) -> tf.data.Dataset:
        """Return the pipeline, which yields ``(inputs[i], labels[i])`` batches in ``order`` when iterated."""
        self._order, self._labels, self._batch_size = order, labels, batch_size
        return self.dataset

    def _generate(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order, labels, size = self._order, self._labels, self._batch_size
        for start in range(0, len(order), size):
            index = order[start : start + size]
            yield np.asarray(self.inputs[index], dtype=np.float32), labels[index].astype(np.int64)


class FoldTrainer:
    """Trains one trial's configuration on fold after fold.

    Every fold starts from the same state: the base weights and the trial's
    initial head. Above a cached cut, the models and their traced steps come
    from a :class:`~sweep.network.Network` that the caller may share with
    later trials, so only the first trial with a given cut pays for tracing.
    The uncached path traces its steps anew for every phase of every fold,
    as compiling a Keras model does in a hand-written loop.

    Args:
        config: The study configuration (model and training sections).
        params: The trial's hyperparameters.
        source: Where inputs come from for each cut.
        n_classes: Number of classes.
        base_weights: VGG16 base weights, or None for random initialisation.
            Ignored when ``network`` is given, because it has its own.
        seed: Seed of the head initialisation and dropout.
        precision: Keras dtype policy of the model.
        network: The worker's shared network; None builds one for this trial alone.
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
        network: Network | None = None,
    ) -> None:
        self.config = config
        self.params = params
        self.source = source
        self.cached = source.cached and not config.train.augment
        keras.utils.set_random_seed(seed)
        if network is None:
            network = Network(
                n_classes,
                config.model.input_size,
                base_weights,
                config.train,
                config.model.pooling,
                precision,
                head_width=params.head_units,
                max_unfreeze=params.unfreeze_layers,
                augment=config.train.augment,
            )
        self.network = network
        self.head = network.head_start(params, seed)

    @property
    def model(self) -> keras.Model:
        """A plain Keras model with the trial's head width and the weights as trained so far."""
        return self.network.export(self.params)

    def train(self, fold: FoldData, seed: int, on_epoch: Callable[[EpochResult], None] | None = None) -> FoldResult:
        """Train on one fold in two phases and score every epoch.

        Training metrics come from the training pass itself, as Keras reports
        them: dropout is active and the weights change from batch to batch.

        Args:
            fold: The fold's training and validation indices and all labels.
            seed: Seed of this fold's batch order.
            on_epoch: Called with each epoch's result as soon as it is scored.

        Returns:
            The fold's epochs. Training stops early when the loss becomes NaN or infinite.
        """
        started = time.perf_counter()
        self.network.restart(self.head)
        order_rng = np.random.default_rng(seed)
        result = FoldResult()
        config, params = self.config, self.params
        phases = ((1, config.train.warmup_epochs, config.train.warmup_learning_rate, 0.0), (2, config.train.epochs, params.learning_rate, params.decay))
        for phase, epochs, learning_rate, decay in phases:
            if epochs == 0:
                continue
            convolutions = trained_convolutions(phase, params.unfreeze_layers)
            cut = cut_layer(phase, params.unfreeze_layers) if self.cached else None
            steps = self.network.step_functions(cut, convolutions, keep=self.cached)
            self.network.start_phase(learning_rate, decay)
            if self._run_phase(steps, self.source.feeder(cut), fold, phase, epochs, order_rng, result, on_epoch):
                break
        result.duration_s = time.perf_counter() - started
        return result

    def _run_phase(
        self,
        steps: tuple[TrainStep, PredictStep],
        feeder: BatchFeeder,
        fold: FoldData,
        phase: int,
        epochs: int,
        order_rng: np.random.Generator,
        result: FoldResult,
        on_epoch: Callable[[EpochResult], None] | None,
    ) -> bool:
        """Train one phase; return True when the loss diverged and the fold must stop."""
        train_step, predict_step = steps
        stopping = self.config.train.early_stopping if phase == 2 else None
        best, waited = math.inf, 0
        for _ in range(epochs):
            epoch_started = time.perf_counter()
            order = order_rng.permutation(fold.train_index)
            losses, parts = [], []
            for x, y in feeder.epoch(fold.labels, order, self.config.train.batch_size):
                loss, probabilities = train_step(x, y)
                losses.append(float(loss))
                parts.append(probabilities.numpy())
            duration = time.perf_counter() - epoch_started
            result.val_probabilities = _predict(predict_step, feeder.inputs, fold.val_index, self.network.n_classes)
            epoch = EpochResult(
                epoch=len(result.epochs) + 1,
                phase=phase,
                learning_rate=self.network.learning_rate,
                duration_s=duration,
                train=_metrics_or_nan(fold.labels[order], np.concatenate(parts)),
                val=_metrics_or_nan(fold.labels[fold.val_index], result.val_probabilities),
            )
            result.epochs.append(epoch)
            if on_epoch is not None:
                on_epoch(epoch)
            loss = float(np.mean(losses))
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


def _predict(predict_step: PredictStep, inputs: np.ndarray, index: np.ndarray, n_classes: int, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Return class probabilities of ``inputs[index]`` from a traced prediction step, batch by batch."""
    parts = [np.zeros((0, n_classes), dtype=np.float32)]
    for start in range(0, len(index), batch_size):
        batch = np.asarray(inputs[index[start : start + batch_size]], dtype=np.float32)
        parts.append(np.asarray(predict_step(tf.constant(batch)), dtype=np.float32))
    return np.concatenate(parts)


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
