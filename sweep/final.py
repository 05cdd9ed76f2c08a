"""The final model: a refit of the exported configuration on all cross-validation data, and one test score.

``sweep train`` trains one model with the two phases of the sweep on every
training and validation image together, saves it with its preprocessing, and
only then, once, reads and scores the held-out test split if the data has one.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from sweep.config import Config, FloatRange
from sweep.doctor import prepare_dataset
from sweep.errors import SweepError
from sweep.model import HyperParameters
from sweep.precision import resolve_precision
from sweep.preprocess import PREPROCESSING, prepare_images
from sweep.training import FoldData, FoldResult, FoldTrainer, InputSource
from sweep.trials import PARAM_NAMES, study_base_weights

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"


@dataclass(frozen=True)
class FinalModel:
    """Folder, phase 2 epochs, refit time and test metrics of a trained final model."""

    folder: Path
    epochs: int  # phase 2 epochs
    duration_s: float
    test_metrics: dict[str, Any] | None


def final_hyperparameters(config: Config) -> HyperParameters:
    """Return the fixed hyperparameters of an exported config.

    Raises:
        SweepError: A hyperparameter is still a range, or lies outside the source study's range.
    """
    values: dict[str, float] = {}
    ranges = config.origin.search if config.origin is not None else None
    for name in PARAM_NAMES:
        value = getattr(config.search, name)
        if isinstance(value, FloatRange):
            raise SweepError(f"search.{name} must be a single value to train a final model, but got a range; run `sweep export` on the study first")
        allowed = getattr(ranges, name) if ranges is not None else None
        if isinstance(allowed, FloatRange) and not allowed.low <= value <= allowed.high:
            raise SweepError(f"search.{name} must lie in the study's range [{allowed.low}, {allowed.high}], but got {value}")
        values[name] = float(value)
    return HyperParameters(
        learning_rate=values["learning_rate"],
        decay=values["decay"],
        head_units=int(values["head_units"]),
        dropout=values["dropout"],
        unfreeze_layers=int(values["unfreeze_layers"]),
    )


def final_epochs(config: Config) -> int:
    """Return phase 2 epochs: train.final_epochs, else the median best epoch of the exported trial, else train.epochs."""
    if config.train.final_epochs is not None:
        return config.train.final_epochs
    best = [e for e in (config.origin.best_epochs if config.origin else []) if e > 0]
    return max(1, round(statistics.median(best))) if best else config.train.epochs


def default_folder(config: Config) -> Path:
    """Return ``studies/<source study>/final`` (beside the study the config was exported from)."""
    name = config.origin.study if config.origin is not None else config.study.name
    return config.study.folder.parent / name / "final"


def train_final(config: Config, folder: Path | None = None) -> FinalModel:
    """Refit on all cross-validation data, save the model, then score the test split once if there is one."""
    params = final_hyperparameters(config)
    epochs = final_epochs(config)
    dataset, _ = prepare_dataset(config)
    folder = folder or default_folder(config)
    base_weights = study_base_weights(config)
    precision = resolve_precision(config.train.precision)
    prepared = prepare_images(dataset.images, config.model.input_size)
    refit = config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs, "early_stopping": None})})
    logger.info("training the final model on %d images: %d warm-up + %d fine-tuning epochs", len(dataset), config.train.warmup_epochs, epochs)

    started = time.perf_counter()
    trainer = FoldTrainer(refit, params, InputSource(lambda: prepared), dataset.n_classes, base_weights, config.study.seed, precision)
    all_index = np.arange(len(dataset))
    result = trainer.train(FoldData(all_index, np.zeros(0, dtype=np.int64), dataset.labels), seed=config.study.seed)
    duration = time.perf_counter() - started
    if result.diverged:
        raise SweepError("the final model diverged (its training loss became NaN or infinite); lower search.learning_rate and run again")

    model = trainer.model
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder / MODEL_FILE)
    write_preprocessing(folder, config.model.input_size, dataset.class_names)
    _write_history(result, folder)

    from sweep.evaluation import score_test_split

    test_metrics = score_test_split(config, model, dataset.class_names, folder, duration)
    return FinalModel(folder, epochs, duration, test_metrics)


def save_model(model: keras.Model, path: Path) -> Path:
    """Save the model's architecture and weights without its optimizer state.

    Keras 3 saves the optimizer of a compiled model, whose Adam moments would
    more than double the file; a prediction needs neither.
    """
    bare = keras.Model.from_config(model.get_config())
    bare.set_weights(model.get_weights())
    bare.save(path)
    return path


def write_preprocessing(folder: Path, input_size: int, class_names: tuple[str, ...]) -> Path:
    """Write preprocessing.json: everything `sweep predict` needs to prepare images as in training."""
    path = folder / PREPROCESSING_FILE
    spec = {
        "input_size": input_size,
        "channels": "grayscale copied to three channels; RGBA loses alpha; palette converted to RGB",
        "resize": "bilinear, antialiased, to input_size x input_size",
        "unit_floats_scaled_by": 255,
        "function": PREPROCESSING,
        "class_names": list(class_names),
    }
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return path


def read_preprocessing(folder: Path) -> dict[str, object]:
    """Read preprocessing.json, raising SweepError when it is missing or not from this version."""
    path = folder / PREPROCESSING_FILE
    if not path.is_file():
        raise SweepError(f"model folder '{folder}' must contain {PREPROCESSING_FILE}, written by `sweep train`")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec.get("function") != PREPROCESSING:
        raise SweepError(f"{path} names preprocessing '{spec.get('function')}', but this version applies {PREPROCESSING}")
    return dict(spec)


def _write_history(result: FoldResult, folder: Path) -> None:
    rows = [{"epoch": e.epoch, "phase": e.phase, "learning_rate": e.learning_rate, **{f"train_{k}": v for k, v in e.train.items()}} for e in result.epochs]
    history = pd.DataFrame(rows)
    history.to_csv(folder / "history.csv", index=False)
    from sweep.plots import plot_history

    plot_history(history, folder / "learning_curves.png")
