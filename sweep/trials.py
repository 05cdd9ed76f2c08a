"""Running trials: the Optuna objective over k folds, in the process that trains.

The study runner calls :func:`run_trials` in a worker process (or inline). It
loads the data, the stored fold assignment and the base weights, and sets up
the feature cache. It then runs Optuna trials until the study has enough
completed ones, the worker has run its share, or its memory has grown too much.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import keras
import numpy as np
import optuna
from optuna.trial import TrialState
from sklearn.metrics import confusion_matrix

from sweep.config import Config, FloatRange, IntRange, SearchSection
from sweep.data import Dataset
from sweep.doctor import prepare_dataset
from sweep.features import CacheKey, FeatureCache, cuts_for_config, exclusive_lock, weights_fingerprint
from sweep.folds import iter_folds
from sweep.health import fold_flags, trial_health
from sweep.model import HyperParameters, build_model, dtype_policy, prefix_model
from sweep.network import Network
from sweep.precision import resolve_precision
from sweep.preprocess import PREPROCESSING, prepare_images
from sweep.store import METRICS, Store
from sweep.training import EpochResult, FoldData, FoldTrainer, InputSource
from sweep.weights import load_base_weights, resolve_weights

logger = logging.getLogger(__name__)

PARAM_NAMES = ("learning_rate", "decay", "head_units", "dropout", "unfreeze_layers")
FEATURE_BATCH = 128
# Seconds a worker waits before it looks again whether other workers' trials left room for one more.
CLAIM_POLL_S = 1.0


def resident_memory_mb() -> float:
    """Return this process's current resident memory in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def suggest(trial: optuna.Trial, search: SearchSection) -> HyperParameters:
    """Sample the five hyperparameters; a fixed value is suggested as a one-point range."""
    values: dict[str, float | int] = {}
    for name in PARAM_NAMES:
        spec = getattr(search, name)
        if isinstance(spec, IntRange):
            values[name] = trial.suggest_int(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, FloatRange):
            values[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        elif name in ("head_units", "unfreeze_layers"):
            values[name] = trial.suggest_int(name, int(spec), int(spec))
        else:
            values[name] = trial.suggest_float(name, float(spec), float(spec))
    return HyperParameters(
        learning_rate=float(values["learning_rate"]),
        decay=float(values["decay"]),
        head_units=int(values["head_units"]),
        dropout=float(values["dropout"]),
        unfreeze_layers=int(values["unfreeze_layers"]),
    )


def study_base_weights(config: Config) -> list[np.ndarray] | None:
    """Return the base weights of every fold: ImageNet (or a file), or one random draw fixed by study.seed.

    With ``model.weights: none`` the random base is drawn once per study, not per
    fold, so that the frozen layers, and the cached features, are the same in
    every trial.
    """
    path = resolve_weights(config.model.weights)
    if path is not None:
        return load_base_weights(path)
    keras.utils.set_random_seed(config.study.seed)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = [np.asarray(w) for w in base.get_weights()]
    keras.backend.clear_session()
    return weights


@dataclass
class TrialContext:
    """Data, folds, weights and input source that every trial of one worker reads, set up once per worker."""

    config: Config
    dataset: Dataset
    assignment: np.ndarray
    base_weights: list[np.ndarray] | None
    precision: str
    source: InputSource
    store: Store
    cache_state: str
    network: Network | None = None

    def shared_network(self) -> Network | None:
        """Return the network every cached trial of this worker trains, built on first use; None when the cache is off."""
        if self.cache_state != "on":
            return None
        if self.network is None:
            # Storing missing features is seconds of TensorFlow work, and building and
            # tracing the network is seconds of Python on one core, so both run at once.
            errors: list[BaseException] = []
            store = threading.Thread(target=self._store_features, args=(errors,), name="store-features")
            store.start()
            try:
                self.network = self._build_network()
            finally:
                store.join()
            if errors:
                raise errors[0]
        return self.network

    def _build_network(self) -> Network:
        search = self.config.search
        network = Network(
            self.dataset.n_classes,
            self.config.model.input_size,
            self.base_weights,
            self.config.train,
            self.config.model.pooling,
            self.precision,
            head_width=int(_highest(search.head_units)),
            max_unfreeze=int(_highest(search.unfreeze_layers)),
        )
        low = search.unfreeze_layers.low if isinstance(search.unfreeze_layers, FloatRange) else search.unfreeze_layers
        network.prepare(range(int(low), int(_highest(search.unfreeze_layers)) + 1), self.config.train.batch_size)
        return network

    def _store_features(self, errors: list[BaseException]) -> None:
        """Store the features of every reachable cut unless they exist, and append any exception to ``errors``."""
        try:
            self.source.inputs(cuts_for_config(self.config)[0])
        except BaseException as err:  # re-raised by the thread that waits for this one
            errors.append(err)


def _highest(spec: IntRange | FloatRange | float | int) -> float:
    return spec.high if isinstance(spec, (IntRange, FloatRange)) else spec


def make_context(config: Config, store: Store) -> TrialContext:
    """Load the data, folds and weights, and set up the input source of the configured cache."""
    dataset = prepare_dataset(config)[0]
    stored = store.load_assignment(config.study.name)
    if stored is None:
        raise RuntimeError(f"study '{config.study.name}' has no stored fold assignment")
    assignment = stored[1]
    base_weights = study_base_weights(config)
    precision = resolve_precision(config.train.precision)
    prepared: dict[str, np.ndarray] = {}

    def images() -> np.ndarray:
        if "images" not in prepared:
            logger.info("preparing %d images at %d px", len(dataset), config.model.input_size)
            prepared["images"] = prepare_images(dataset.images, config.model.input_size)
        return prepared["images"]

    cache_state = _cache_state(config)
    features = None
    if cache_state == "on":
        cache = _feature_cache(config, dataset, base_weights, precision)

        def features(cut: str) -> np.ndarray:
            return cache.get(cut, len(dataset), lambda outputs: _fill_features(config, base_weights, precision, images(), outputs))

    return TrialContext(config, dataset, assignment, base_weights, precision, InputSource(images, features), store, cache_state)


def _feature_cache(config: Config, dataset: Dataset, base_weights: list[np.ndarray] | None, precision: str) -> FeatureCache:
    key = CacheKey(
        data=dataset.fingerprint(),
        weights=weights_fingerprint(base_weights),
        input_size=config.model.input_size,
        preprocessing=PREPROCESSING,
        precision=precision,
    )
    return FeatureCache(config.study.folder / "features", key, together=cuts_for_config(config))


def _cache_state(config: Config) -> str:
    if config.train.augment:
        return "bypassed (train.augment is on)"
    return "on" if config.cache.enabled else "off (cache.enabled is false)"


def _fill_features(config: Config, base_weights: list[np.ndarray] | None, precision: str, images: np.ndarray, outputs: dict[str, np.memmap]) -> None:
    """Run the frozen base once over all images and write the output of every cut in ``outputs``."""
    params = HyperParameters(learning_rate=1e-3, decay=0.0, head_units=1, dropout=0.0, unfreeze_layers=0)
    cuts = list(outputs)
    with dtype_policy(precision):
        model = build_model(2, config.model.input_size, base_weights, params, config.model.pooling)
        prefix = prefix_model(model, cuts)
        for start in range(0, len(images), FEATURE_BATCH):
            part = slice(start, start + FEATURE_BATCH)
            predicted = prefix.predict_on_batch(images[part])
            # A model with a one-element output list returns a bare array.
            for cut, values in zip(cuts, predicted if len(cuts) > 1 else [predicted], strict=True):
                outputs[cut][part] = np.asarray(values, dtype=np.float32)
    del model, prefix
    # Not keras.backend.clear_session(): it resets Keras's state in every thread,
    # and the worker builds its network in another thread meanwhile.
    gc.collect()


class TrialDiverged(Exception):
    """A fold's loss became NaN or infinite; Optuna records the trial as failed and the study goes on."""


class Objective:
    """The Optuna objective: k-fold training, the running mean reported after each fold."""

    def __init__(self, context: TrialContext, started: float) -> None:
        self.context = context
        self.started = started

    def __call__(self, trial: optuna.Trial) -> float:
        context = self.context
        config = context.config
        params = suggest(trial, config.search)
        label = f"trial {_completed(trial.study) + 1}/{config.study.n_trials} (#{trial.number})"
        trial.set_user_attr("precision", context.precision)
        trial.set_user_attr("feature_cache", context.cache_state)
        trial.set_user_attr("worker", os.getpid())
        logger.info("%s starts: %s", label, _format_params(params))
        folds: list[dict[str, float]] = []
        n_folds = int(context.assignment.max()) + 1
        self.fold_flags: list[list[str]] = []
        network = context.shared_network()
        seed = config.study.seed * 1_000_003 + trial.number
        trainer = FoldTrainer(config, params, context.source, context.dataset.n_classes, context.base_weights, seed, context.precision, network)
        try:
            for fold, train_index, val_index in iter_folds(context.assignment):
                folds.append(self._run_fold(trial, trainer, fold, FoldData(train_index, val_index, context.dataset.labels), label))
                self._report(trial, folds, fold, n_folds, label)
        finally:
            del trainer
            context.source.release_pages()
            if network is None:
                # A trial's own models are dropped with it; the shared network stays for the next trial.
                keras.backend.clear_session()
            # Measured once the mapped pages are dropped, so that only this process's own memory counts.
            trial.set_user_attr("rss_mb", resident_memory_mb())
            trial.set_user_attr("anon_mb", anonymous_memory_mb())
        return self._finish(trial, folds, label)

    def _report(self, trial: optuna.Trial, folds: list[dict[str, float]], fold: int, n_folds: int, label: str) -> None:
        """Report the running mean to the pruner and raise TrialPruned when the pruner decides to stop the trial."""
        config = self.context.config
        running = float(np.mean([s[config.study.objective] for s in folds]))
        trial.set_user_attr("folds_run", len(folds))
        # The step is the fold index, so it never repeats within a trial and a
        # trial is compared with others after the same number of folds.
        trial.report(running, step=fold)
        if fold + 1 < n_folds and trial.should_prune():
            logger.info("%s pruned after fold %d: running mean %s %.4f", label, fold + 1, config.study.objective, running)
            raise optuna.TrialPruned()

    def _run_fold(self, trial: optuna.Trial, trainer: FoldTrainer, fold: int, data: FoldData, label: str) -> dict[str, float]:
        context = self.context
        config = context.config
        n_folds = int(context.assignment.max()) + 1
        total_epochs = config.train.warmup_epochs + config.train.epochs

        def on_epoch(result: EpochResult) -> None:
            context.store.save_epoch(config.study.name, trial.number, fold, **result.row())
            logger.info(
                "%s fold %d/%d epoch %d/%d (phase %d): train loss %.4f, val loss %.4f, val acc %.3f, val AUC %.3f; elapsed %s",
                label, fold + 1, n_folds, result.epoch, total_epochs, result.phase,
                result.train["loss"], result.val["loss"], result.val["accuracy"], result.val["auc"], _elapsed(self.started),
            )  # fmt: skip

        result = trainer.train(data, seed=config.study.seed * 1_000_003 + trial.number * 101 + fold, on_epoch=on_epoch)
        final = result.final
        val_labels = data.labels[data.val_index]
        flags = fold_flags(result, val_labels)
        self.fold_flags.append(flags)
        values: dict[str, float | int] = {
            "n_train": len(data.train_index),
            "n_val": len(data.val_index),
            "epochs_run": len(result.epochs),
            "best_epoch": result.best_epoch(config.study.objective),
            "duration_s": result.duration_s,
        }
        values.update({f"train_{k}": v for k, v in final.train.items()})
        values.update({f"val_{k}": v for k, v in final.val.items()})
        probabilities = result.val_probabilities
        confusion = None
        if probabilities is not None and np.isfinite(probabilities).all():
            matrix = confusion_matrix(val_labels, probabilities.argmax(axis=1), labels=list(range(context.dataset.n_classes)))
            confusion = json.dumps(matrix.tolist())
        context.store.save_fold(config.study.name, trial.number, fold, flags=",".join(flags), confusion=confusion, **values)
        if probabilities is not None and np.isfinite(probabilities).all():
            context.store.save_predictions(config.study.name, trial.number, fold, data.val_index, val_labels, probabilities)
        trial.set_user_attr("health", trial_health(self.fold_flags))
        if flags:
            logger.warning("%s fold %d/%d flagged %s", label, fold + 1, n_folds, ", ".join(flags))
        if result.diverged:
            reason = f"diverged: the training loss became non-finite in fold {fold + 1}, epoch {final.epoch}"
            trial.set_user_attr("fail_reason", reason)
            raise TrialDiverged(reason)
        if fold == 0 and "collapsed" in flags and config.study.prune_collapsed:
            logger.info("%s pruned: its first fold collapsed to one class (study.prune_collapsed)", label)
            raise optuna.TrialPruned()
        return final.val

    def _finish(self, trial: optuna.Trial, folds: list[dict[str, float]], label: str) -> float:
        objective = self.context.config.study.objective
        for metric in METRICS:
            values = np.array([f[metric] for f in folds], dtype=np.float64)
            trial.set_user_attr(f"val_{metric}_mean", float(np.mean(values)))
            trial.set_user_attr(f"val_{metric}_std", float(np.std(values)))
        mean = float(np.mean([f[objective] for f in folds]))
        std = float(np.std([f[objective] for f in folds]))
        logger.info("%s done: %s %.4f ± %.4f over %d folds; elapsed %s", label, objective, mean, std, len(folds), _elapsed(self.started))
        if not math.isfinite(mean):
            logger.warning("%s has a non-finite %s (the model diverged); Optuna records it as failed", label, objective)
        return mean


def anonymous_memory_mb() -> float:
    """Return this process's resident memory less the pages mapped from files, in MiB.

    Pages of the memory-mapped feature files count as resident once read, but
    the kernel can drop them at any time. Only anonymous memory shows a leak.
    Where /proc is missing, this returns :func:`resident_memory_mb`.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resident_memory_mb()


class _Recycle:
    """The rule that ends a worker after its share of trials or once its anonymous memory has grown."""

    def __init__(self, max_trials: int, growth: float) -> None:
        self.max_trials = max_trials
        self.growth = growth
        self.baseline: float | None = None
        self.count = 0

    def after_trial(self) -> bool:
        """Count a finished trial and return True when the worker should exit and a fresh one continue."""
        self.count += 1
        rss = anonymous_memory_mb()
        if self.baseline is None:
            self.baseline = rss
        if self.count >= self.max_trials:
            logger.debug("worker %d ran its %d trials; a fresh one continues", os.getpid(), self.count)
            return True
        if rss > self.baseline * (1 + self.growth):
            logger.debug("worker %d grew from %.0f to %.0f MiB; a fresh one continues", os.getpid(), self.baseline, rss)
            return True
        return False


def run_trials(config: Config, first: int, max_new: int, started: float, deadline: float | None) -> None:
    """Run trials of the stored study in this process until one of the stop conditions holds.

    Several workers may run this at once on the same study. Each claims its
    next trial under a lock on the study folder, so that together they start
    at most ``max_new`` trials and complete at most ``study.n_trials``.

    Args:
        config: The validated configuration.
        first: Number of the first trial of this run; trials from it on count towards ``max_new``.
        max_new: Maximum number of trials this run may start, over all its workers.
        started: ``time.time()`` at the start of the whole run, for elapsed times.
        deadline: ``time.time()`` after which no trial starts, or None.
    """
    store = Store(config.study.storage_url)
    try:
        context = make_context(config, store)
        study = optuna.load_study(study_name=config.study.name, storage=config.study.storage_url, sampler=_sampler(config), pruner=_pruner(config))
        objective = Objective(context, started)
        # Only a worker process can be replaced; inline trials run to the end.
        recycle = _Recycle(config.runtime.max_trials_per_worker, config.runtime.memory_growth) if config.runtime.workers == "process" else None
        while (trial := _claim_trial(config, study, first, max_new, deadline)) is not None:
            _run_trial(study, trial, objective)
            if recycle is not None and recycle.after_trial():
                break
    finally:
        store.dispose()


def _claim_trial(config: Config, study: optuna.Study, first: int, max_new: int, deadline: float | None) -> optuna.Trial | None:
    """Start the next trial, or return None when the run is done (see :func:`claim_decision`)."""
    config.study.folder.mkdir(parents=True, exist_ok=True)
    while deadline is None or time.time() < deadline:
        # The lock is shared by every worker of the study, so two never claim the last free trial.
        with exclusive_lock(config.study.folder / ".trials.lock"):
            decision = claim_decision(config, study, first, max_new)
            if decision == "done":
                return None
            if decision == "start":
                return study.ask()
        time.sleep(CLAIM_POLL_S)
    return None


def claim_decision(config: Config, study: optuna.Study, first: int, max_new: int) -> Literal["start", "wait", "done"]:
    """Return whether a worker may start a trial now, must wait for running ones to end, or is done.

    The run is done once it has started ``max_new`` trials or the study has
    ``study.n_trials`` completed ones. While running trials could still bring
    it there, a worker waits, because a pruned one leaves room for another trial.
    """
    trials = study.get_trials(deepcopy=False)
    completed = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    if sum(t.number >= first for t in trials) >= max_new or completed >= config.study.n_trials:
        return "done"
    return "start" if completed + running < config.study.n_trials else "wait"


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> None:
    """Run the objective on one trial and record how it ended, as ``Study.optimize`` does."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except TrialDiverged as err:
        logger.warning("trial #%d failed: %s", trial.number, err)
        study.tell(trial, state=TrialState.FAIL)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        # A non-finite value is recorded as a failed trial, with Optuna's warning.
        study.tell(trial, value)


def _sampler(config: Config) -> optuna.samplers.BaseSampler:
    if config.study.sampler == "random":
        return TrialSeededSampler(optuna.samplers.RandomSampler, config.study.seed)
    return TrialSeededSampler(optuna.samplers.TPESampler, config.study.seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Runs each trial on a fresh sampler seeded with the study seed plus the trial number.

    A seeded Optuna sampler draws from one random sequence, so what trial n
    samples would depend on how many trials the same process drew before, and
    a replaced worker would start the sequence again. Seeding per trial makes
    a study's trials the same however many worker processes ran them. TPE
    reads the finished trials from the storage, so a fresh instance loses nothing.

    Args:
        make: Creates a sampler from a seed, such as ``optuna.samplers.TPESampler``.
        seed: The study seed.
    """

    def __init__(self, make: Callable[..., optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._sampler = make(seed=seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._sampler = self._make(seed=self._seed + trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, optuna.distributions.BaseDistribution]
    ) -> dict[str, object]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str, param_distribution: optuna.distributions.BaseDistribution
    ) -> object:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def _pruner(config: Config) -> optuna.pruners.BasePruner:
    if config.study.pruner == "median":
        # Steps are fold indices; a trial is compared with others after the same fold.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if config.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.cv.folds)
    return optuna.pruners.NopPruner()


def _completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _format_params(params: HyperParameters) -> str:
    return (
        f"learning_rate={params.learning_rate:.3g}, decay={params.decay:.3g}, head_units={params.head_units}, "
        f"dropout={params.dropout:.2f}, unfreeze_layers={params.unfreeze_layers}"
    )


def _elapsed(started: float) -> str:
    seconds = int(time.time() - started)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
