"""Training of one fold: head warm-up, then fine-tuning of the top layers, with per-epoch metrics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from sweep.config import Config
from sweep.metrics import classification_metrics
from sweep.model import HyperParameters, build_model, freeze_for_phase, make_optimizer

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

    @property
    def final(self) -> EpochResult:
        return self.epochs[-1]

    def best_epoch(self, objective: str) -> int:
        """Return the phase 2 epoch (1-based within phase 2) with the best validation objective."""
        phase2 = [e for e in self.epochs if e.phase == 2]
        if not phase2:
            return 0
        values = [e.val[objective] for e in phase2]
        values = [v if math.isfinite(v) else (math.inf if objective == "loss" else -math.inf) for v in values]
        index = int(np.argmin(values)) if objective == "loss" else int(np.argmax(values))
        return index + 1


class _EpochMetrics(keras.callbacks.Callback):
    """Scores training and validation images in inference mode after every epoch."""

    def __init__(self, run: _FoldRun, phase: int) -> None:
        super().__init__()
        self.run = run
        self.phase = phase
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.run.record_epoch(self.phase, time.perf_counter() - self.started)


class _FoldRun:
    def __init__(
        self,
        model: keras.Model,
        data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        on_epoch: Callable[[EpochResult], None] | None,
    ) -> None:
        self.model = model
        self.x_train, self.y_train, self.x_val, self.y_val = data
        self.on_epoch = on_epoch
        self.result = FoldResult()

    def record_epoch(self, phase: int, duration_s: float) -> None:
        optimizer = self.model.optimizer
        result = EpochResult(
            epoch=len(self.result.epochs) + 1,
            phase=phase,
            learning_rate=float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            duration_s=duration_s,
            train=classification_metrics(self.y_train, predict_proba(self.model, self.x_train)),
            val=classification_metrics(self.y_val, predict_proba(self.model, self.x_val)),
        )
        self.result.epochs.append(result)
        if self.on_epoch is not None:
            self.on_epoch(result)


def predict_proba(model: keras.Model, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Return class probabilities, calling the model directly in inference mode batch by batch."""
    parts = [keras.ops.convert_to_numpy(model(images[start : start + batch_size], training=False)) for start in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32)


def train_fold(
    config: Config,
    params: HyperParameters,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    n_classes: int,
    base_weights: list[np.ndarray] | None,
    seed: int,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> FoldResult:
    """Train a fresh model on one fold in two phases and score every epoch.

    Args:
        config: The study configuration (model and training sections).
        params: The trial's hyperparameters.
        data: Prepared training images, training labels, validation images, validation labels.
        n_classes: Number of classes.
        base_weights: VGG16 base weights, or None for random initialisation.
        seed: Seed of the weight initialisation, shuffling and dropout of this fold.
        on_epoch: Called with each epoch's result as soon as it is scored.

    Returns:
        The fold's epochs. Training stops early when the loss becomes NaN or infinite.
    """
    started = time.perf_counter()
    # Keras reads one global seed for initialisers, shuffling and dropout; it is
    # set again at every fold so no random state carries over between folds or trials.
    keras.utils.set_random_seed(seed)
    model = build_model(n_classes, config.model.input_size, base_weights, params, config.model.pooling)
    run = _FoldRun(model, data, on_epoch)
    x_train, y_train = data[0], data[1]
    phases = ((1, config.train.warmup_epochs, config.train.warmup_learning_rate, 0.0), (2, config.train.epochs, params.learning_rate, params.decay))
    for phase, epochs, learning_rate, decay in phases:
        if epochs == 0:
            continue
        freeze_for_phase(model, phase, params.unfreeze_layers)
        model.compile(optimizer=make_optimizer(config.train, learning_rate, decay), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        history = model.fit(
            x_train,
            y_train,
            batch_size=config.train.batch_size,
            epochs=epochs,
            shuffle=True,
            verbose=0,
            callbacks=[_EpochMetrics(run, phase), keras.callbacks.TerminateOnNaN()],
        )
        losses = history.history.get("loss", [])
        if losses and not math.isfinite(losses[-1]):
            logger.warning("training loss became %s in phase %d; the fold stops here", losses[-1], phase)
            break
    run.result.duration_s = time.perf_counter() - started
    return run.result
