"""The study runner: checks everything, then runs Optuna trials of k-fold VGG16 fine-tuning in worker processes."""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from sweep.config import Config, RuntimeSection, config_from_dict, config_to_dict
from sweep.data import Dataset
from sweep.doctor import prepare_dataset
from sweep.errors import SweepError, WorkerError
from sweep.features import check_budget
from sweep.folds import assign_folds, check_folds
from sweep.store import Store
from sweep.trials import claim_decision, run_trials
from sweep.weights import resolve_weights

logger = logging.getLogger(__name__)

# Maximum number of worker processes that ``runtime.parallel: auto`` runs at once.
# NOTE: a guess; auto has been measured only on a 2-core machine.
MAX_AUTO_WORKERS = 4
# Seconds between the runner's checks on its workers.
WORKER_POLL_S = 1.0


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
    first = len(study.get_trials(deepcopy=False))
    if config.runtime.workers == "inline":
        run_trials(config, first, max_new, started, deadline)
    else:
        _run_workers(config, study, first, max_new, started, deadline)
    return study


def worker_layout(runtime: RuntimeSection, cpus: int, gpus: int) -> tuple[int, int | None]:
    """Return how many worker processes run at once and how many threads each gives TensorFlow (None: its default).

    On a CPU, TensorFlow's speed does not grow in proportion to its threads on
    layers this small. On a 2-core Xeon (TensorFlow 2.21, bfloat16), two workers
    with one thread each trained about 18% more images per second than one
    worker with two. Several processes on one GPU compete for its memory, so
    ``auto`` runs one worker there.
    """
    if runtime.workers == "inline":
        return 1, None
    automatic = 1 if gpus else max(1, min(cpus, MAX_AUTO_WORKERS))
    count = automatic if runtime.parallel == "auto" else runtime.parallel
    return count, (max(1, cpus // count) if count > 1 else None)


def _run_workers(config: Config, study: optuna.Study, first: int, max_new: int, started: float, deadline: float | None) -> None:
    """Keep ``runtime.parallel`` worker processes running until the study is done or a limit is reached."""
    count, threads = worker_layout(config.runtime, _cpu_count(), _gpu_count() if config.runtime.parallel == "auto" else 0)
    if count > 1:
        logger.info("running trials in %d worker processes at once, %d TensorFlow thread(s) each", count, threads)
    context = multiprocessing.get_context("spawn")
    data = config.model_dump(mode="json")
    args = (data, first, max_new, started, deadline, logging.getLogger("sweep").level)
    # Each running worker, mapped to the number of trials the study had when it started.
    running: dict[multiprocessing.process.BaseProcess, int] = {}
    while True:
        for process in [p for p in running if p.exitcode is not None]:
            trials_at_start = running.pop(process)
            if process.exitcode != 0:
                _stop(running)
                raise WorkerError(process.exitcode or 1)
            if not running and len(study.get_trials(deepcopy=False)) == trials_at_start:
                # A worker that ran nothing would be followed by another that runs nothing.
                return
        while len(running) < count and _room(config, study, first, max_new, deadline):
            process = context.Process(target=worker_main, args=args)
            with _environment(_thread_settings(threads)):
                process.start()
            running[process] = len(study.get_trials(deepcopy=False))
        if not running:
            return
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=WORKER_POLL_S)


def _room(config: Config, study: optuna.Study, first: int, max_new: int, deadline: float | None) -> bool:
    """Return whether a worker started now could start a trial."""
    if deadline is not None and time.time() >= deadline:
        return False
    return claim_decision(config, study, first, max_new) == "start"


def _stop(running: dict[multiprocessing.process.BaseProcess, int]) -> None:
    for process in running:
        process.terminate()
    for process in running:
        process.join()


def _cpu_count() -> int:
    """Return the CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def _thread_settings(threads: int | None) -> dict[str, str]:
    """Return TensorFlow's thread variables for a worker, leaving out any the user has set."""
    if threads is None:
        return {}
    names = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
    return {name: str(threads) for name in names if name not in os.environ}


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while a child process starts, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_main(data: dict[str, object], first: int, max_new: int, started: float, deadline: float | None, log_level: int) -> None:
    """Entry point of a worker process: configure logging, then run trials.

    A SweepError is printed as one line and ends the worker with status 2.
    """
    from sweep.cli import configure_logging
    from sweep.tf_quiet import import_tensorflow_quietly

    configure_logging(verbose=log_level <= logging.DEBUG)
    import_tensorflow_quietly()
    try:
        run_trials(config_from_dict(data), first, max_new, started, deadline)
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
