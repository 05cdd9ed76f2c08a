"""The study runner: checks everything, then runs Optuna trials of k-fold VGG16 fine-tuning in worker processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from sweep.config import Config, config_from_dict, config_to_dict
from sweep.data import Dataset
from sweep.doctor import prepare_dataset
from sweep.errors import SweepError, WorkerError
from sweep.features import check_budget
from sweep.folds import assign_folds, check_folds
from sweep.store import Store
from sweep.trials import run_trials
from sweep.weights import resolve_weights

logger = logging.getLogger(__name__)


def run_study(config: Config) -> optuna.Study:
    """Run the study until ``study.n_trials`` trials have completed.

    Every check that can fail on user input runs before the study folder or
    database is touched, so a rejected run leaves nothing behind. Trials then
    run in worker processes that are replaced after ``runtime.max_trials_per_worker``
    trials or once their memory grows by ``runtime.memory_growth``, because
    clearing the Keras session does not return all memory between trials.

    Raises:
        SweepError: Invalid data, weights or a study that conflicts with the config.
        WorkerError: A worker process failed.
    """
    dataset, doctor = prepare_dataset(config)
    check_folds(dataset.labels, config.cv.folds, dataset.groups)
    resolve_weights(config.model.weights)
    check_budget(config, len(dataset))
    _check_existing(config, dataset)

    logger.info("loaded %d images of %d classes from %s", len(dataset), dataset.n_classes, dataset.origin)
    for finding in doctor.warnings:
        logger.warning("data check: %s: %s", finding.check.replace("_", " "), finding.message)
    config.study.folder.mkdir(parents=True, exist_ok=True)
    doctor_json = json.dumps(doctor.to_dict(), indent=1)
    (config.study.folder / "doctor.json").write_text(doctor_json, encoding="utf-8")
    store = Store(config.study.storage_url)
    _fold_assignment(config, dataset, store, doctor_json)
    store.dispose()
    study = _create_study(config)
    _fail_stale_trials(study)

    if _completed(study) >= config.study.n_trials:
        logger.info("study %s already has %d completed trials; nothing to run", config.study.name, _completed(study))
        return study
    logger.info("study %s: %d completed, running until %d", config.study.name, _completed(study), config.study.n_trials)
    started = time.time()
    deadline = None if config.study.timeout is None else started + config.study.timeout
    max_new = config.study.max_trials or 3 * config.study.n_trials
    if config.runtime.workers == "inline":
        run_trials(config, max_new, started, deadline)
    else:
        _run_workers(config, study, max_new, started, deadline)
    return study


def _run_workers(config: Config, study: optuna.Study, max_new: int, started: float, deadline: float | None) -> None:
    """Start one worker process after another until the study is done or a limit is reached."""
    context = multiprocessing.get_context("spawn")
    attempted = 0
    data = config.model_dump(mode="json")
    while attempted < max_new and _completed(study) < config.study.n_trials:
        if deadline is not None and time.time() >= deadline:
            break
        before = len(study.get_trials(deepcopy=False))
        process = context.Process(target=worker_main, args=(data, max_new - attempted, started, deadline, logging.getLogger("sweep").level))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise WorkerError(process.exitcode or 1)
        new = len(study.get_trials(deepcopy=False)) - before
        if new == 0:
            break
        attempted += new


def worker_main(data: dict[str, object], max_new: int, started: float, deadline: float | None, log_level: int) -> None:
    """Entry point of a worker process: configure logging, then run trials.

    A SweepError is printed as one line and ends the worker with status 2.
    """
    from sweep.cli import configure_logging
    from sweep.tf_quiet import import_tensorflow_quietly

    configure_logging(verbose=log_level <= logging.DEBUG)
    import_tensorflow_quietly()
    try:
        run_trials(config_from_dict(data), max_new, started, deadline)
    except SweepError as err:
        print(f"sweep: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err


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


def _fold_assignment(config: Config, dataset: Dataset, store: Store, doctor_json: str) -> np.ndarray:
    stored = store.load_assignment(config.study.name)
    if stored is not None:
        return stored[1]
    assignment = assign_folds(dataset.labels, config.cv.folds, config.study.seed, dataset.groups, dataset.clusters)
    store.save_assignment(
        config.study.name,
        assignment,
        dataset.labels,
        dataset.groups,
        fingerprint=dataset.fingerprint(),
        seed=config.study.seed,
        class_names=dataset.class_names,
        config_yaml=yaml.safe_dump(config_to_dict(config), sort_keys=False),
        doctor_json=doctor_json,
    )
    return assignment


def _create_study(config: Config) -> optuna.Study:
    try:
        return optuna.create_study(
            study_name=config.study.name,
            storage=config.study.storage_url,
            direction=config.study.direction,
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
