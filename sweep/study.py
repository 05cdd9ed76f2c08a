"""The study runner: checks everything, then runs Optuna trials of k-fold VGG16 fine-tuning."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from sweep.config import Config, FloatRange, IntRange, SearchSection, config_to_dict
from sweep.data import Dataset, load_dataset
from sweep.errors import SweepError
from sweep.folds import assign_folds, check_folds, iter_folds
from sweep.model import HyperParameters
from sweep.preprocess import prepare_images
from sweep.store import METRICS, Store
from sweep.training import EpochResult, train_fold
from sweep.weights import load_base_weights, resolve_weights

logger = logging.getLogger(__name__)

PARAM_NAMES = ("learning_rate", "decay", "head_units", "dropout", "unfreeze_layers")


@dataclass
class _Inputs:
    """Everything a trial reads, prepared once per run."""

    images: np.ndarray
    labels: np.ndarray
    n_classes: int
    assignment: np.ndarray
    base_weights: list[np.ndarray] | None


def run_study(config: Config) -> optuna.Study:
    """Run the study until ``study.n_trials`` trials have completed.

    Every check that can fail on user input runs before the study folder or
    database is touched, so a rejected run leaves nothing behind.

    Raises:
        SweepError: Invalid data, weights or a study that conflicts with the config.
    """
    dataset = load_dataset(config)
    check_folds(dataset.labels, config.cv.folds, dataset.groups)
    weights_path = resolve_weights(config.model.weights)
    base_weights = load_base_weights(weights_path) if weights_path is not None else None
    _check_existing(config, dataset)

    logger.info("loaded %d images of %d classes from %s", len(dataset), dataset.n_classes, dataset.origin)
    config.study.folder.mkdir(parents=True, exist_ok=True)
    store = Store(config.study.storage_url)
    assignment = _fold_assignment(config, dataset, store)
    study = _create_study(config)
    _fail_stale_trials(study)

    logger.info("preparing %d images at %d px", len(dataset), config.model.input_size)
    inputs = _Inputs(
        images=prepare_images(dataset.images, config.model.input_size),
        labels=dataset.labels,
        n_classes=dataset.n_classes,
        assignment=assignment,
        base_weights=base_weights,
    )
    objective = _Objective(config, inputs, store)
    remaining = config.study.n_trials - _completed(study)
    if remaining <= 0:
        logger.info("study %s already has %d completed trials; nothing to run", config.study.name, _completed(study))
        return study
    max_new = config.study.max_trials or 3 * config.study.n_trials
    logger.info("study %s: %d completed, running until %d", config.study.name, _completed(study), config.study.n_trials)
    study.optimize(
        objective,
        n_trials=max_new,
        timeout=config.study.timeout,
        callbacks=[optuna.study.MaxTrialsCallback(config.study.n_trials, states=(TrialState.COMPLETE,))],
        catch=(),
    )
    store.dispose()
    return study


def _check_existing(config: Config, dataset: Dataset) -> None:
    """Reject a run whose data or folds differ from those the study started with."""
    url = config.study.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return
    store = Store(url)
    try:
        stored = store.load_assignment(config.study.name)
    finally:
        store.dispose()
    if stored is None:
        return
    record, _ = stored
    if record.data_fingerprint != dataset.fingerprint():
        raise SweepError(
            f"study.name '{config.study.name}' was started on other data ({record.n_samples} images, fingerprint {record.data_fingerprint[:12]}); "
            "use a new study.name for this data"
        )
    if record.n_folds != config.cv.folds or record.seed != config.study.seed:
        raise SweepError(
            f"study.name '{config.study.name}' was started with cv.folds={record.n_folds} and study.seed={record.seed}, "
            f"but got cv.folds={config.cv.folds} and study.seed={config.study.seed}; use a new study.name to change them"
        )


def _fold_assignment(config: Config, dataset: Dataset, store: Store) -> np.ndarray:
    stored = store.load_assignment(config.study.name)
    if stored is not None:
        return stored[1]
    assignment = assign_folds(dataset.labels, config.cv.folds, config.study.seed, dataset.groups)
    store.save_assignment(
        config.study.name,
        assignment,
        dataset.labels,
        dataset.groups,
        fingerprint=dataset.fingerprint(),
        seed=config.study.seed,
        class_names=dataset.class_names,
        config_yaml=yaml.safe_dump(config_to_dict(config), sort_keys=False),
    )
    return assignment


def _create_study(config: Config) -> optuna.Study:
    sampler: optuna.samplers.BaseSampler = (
        optuna.samplers.RandomSampler(seed=config.study.seed) if config.study.sampler == "random" else optuna.samplers.TPESampler(seed=config.study.seed)
    )
    pruner: optuna.pruners.BasePruner
    if config.study.pruner == "median":
        # Steps are fold indices; a trial is compared with others after the same fold.
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    elif config.study.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.cv.folds)
    else:
        pruner = optuna.pruners.NopPruner()
    try:
        return optuna.create_study(
            study_name=config.study.name,
            storage=config.study.storage_url,
            direction=config.study.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except ValueError as err:
        raise SweepError(f"study.objective '{config.study.objective}' conflicts with the stored study '{config.study.name}': {err}") from err


def _fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials left RUNNING by an interrupted earlier run as failed."""
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.warning("trial %d was left running by an interrupted run; marking it failed", trial.number)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def suggest(trial: optuna.Trial, search: SearchSection) -> HyperParameters:
    """Sample the five hyperparameters; a fixed value is suggested as a one-point range."""
    values: dict[str, float | int] = {}
    for name in PARAM_NAMES:
        spec = getattr(search, name)
        if isinstance(spec, IntRange):
            values[name] = trial.suggest_int(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, FloatRange):
            values[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, int) and name in ("head_units", "unfreeze_layers"):
            values[name] = trial.suggest_int(name, spec, spec)
        else:
            values[name] = trial.suggest_float(name, float(spec), float(spec))
    return HyperParameters(
        learning_rate=float(values["learning_rate"]),
        decay=float(values["decay"]),
        head_units=int(values["head_units"]),
        dropout=float(values["dropout"]),
        unfreeze_layers=int(values["unfreeze_layers"]),
    )


class _Objective:
    def __init__(self, config: Config, inputs: _Inputs, store: Store) -> None:
        self.config = config
        self.inputs = inputs
        self.store = store
        self.started = time.perf_counter()

    def __call__(self, trial: optuna.Trial) -> float:
        config = self.config
        params = suggest(trial, config.search)
        done = _completed(trial.study)
        label = f"trial {done + 1}/{config.study.n_trials} (#{trial.number})"
        logger.info("%s starts: %s", label, _format_params(params))
        folds: list[dict[str, float]] = []
        for fold, train_index, val_index in iter_folds(self.inputs.assignment):
            scores = self._run_fold(trial, params, fold, train_index, val_index, label)
            folds.append(scores)
            keras.backend.clear_session()
            running = float(np.mean([s[config.study.objective] for s in folds]))
            trial.report(running, step=fold)
            if trial.should_prune():
                trial.set_user_attr("folds_run", len(folds))
                logger.info("%s pruned after fold %d: running mean %s %.4f", label, fold + 1, config.study.objective, running)
                raise optuna.TrialPruned()
        return self._finish(trial, folds, label)

    def _run_fold(
        self, trial: optuna.Trial, params: HyperParameters, fold: int, train_index: np.ndarray, val_index: np.ndarray, label: str
    ) -> dict[str, float]:
        config, inputs = self.config, self.inputs
        n_folds = int(inputs.assignment.max()) + 1
        total_epochs = config.train.warmup_epochs + config.train.epochs

        def on_epoch(result: EpochResult) -> None:
            self.store.save_epoch(config.study.name, trial.number, fold, **result.row())
            logger.info(
                "%s fold %d/%d epoch %d/%d (phase %d): train loss %.4f, val loss %.4f, val acc %.3f, val AUC %.3f; elapsed %s",
                label,
                fold + 1,
                n_folds,
                result.epoch,
                total_epochs,
                result.phase,
                result.train["loss"],
                result.val["loss"],
                result.val["accuracy"],
                result.val["auc"],
                _elapsed(self.started),
            )

        data = (inputs.images[train_index], inputs.labels[train_index], inputs.images[val_index], inputs.labels[val_index])
        seed = config.study.seed * 1_000_003 + trial.number * 101 + fold
        result = train_fold(config, params, data, inputs.n_classes, inputs.base_weights, seed, on_epoch)
        final = result.final
        values: dict[str, float | int] = {
            "n_train": len(train_index),
            "n_val": len(val_index),
            "epochs_run": len(result.epochs),
            "best_epoch": result.best_epoch(config.study.objective),
            "duration_s": result.duration_s,
        }
        values.update({f"train_{k}": v for k, v in final.train.items()})
        values.update({f"val_{k}": v for k, v in final.val.items()})
        self.store.save_fold(config.study.name, trial.number, fold, **values)
        return final.val

    def _finish(self, trial: optuna.Trial, folds: list[dict[str, float]], label: str) -> float:
        objective = self.config.study.objective
        for metric in METRICS:
            values = np.array([f[metric] for f in folds], dtype=np.float64)
            trial.set_user_attr(f"val_{metric}_mean", float(np.mean(values)))
            trial.set_user_attr(f"val_{metric}_std", float(np.std(values)))
        trial.set_user_attr("folds_run", len(folds))
        mean = float(np.mean([f[objective] for f in folds]))
        std = float(np.std([f[objective] for f in folds]))
        logger.info("%s done: %s %.4f ± %.4f over %d folds; elapsed %s", label, objective, mean, std, len(folds), _elapsed(self.started))
        if not math.isfinite(mean):
            logger.warning("%s has a non-finite %s (the model diverged); Optuna records it as failed", label, objective)
        return mean


def _format_params(params: HyperParameters) -> str:
    return (
        f"learning_rate={params.learning_rate:.3g}, decay={params.decay:.3g}, head_units={params.head_units}, "
        f"dropout={params.dropout:.2f}, unfreeze_layers={params.unfreeze_layers}"
    )


def _elapsed(started: float) -> str:
    seconds = int(time.perf_counter() - started)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
