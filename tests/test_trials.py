"""Tests for sweep.trials and the worker runner: sampling that does not depend on the worker, and parallel workers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
from conftest import run_sweep, tiny_config, write_yaml
from optuna.trial import TrialState

from sweep.config import RuntimeSection
from sweep.study import worker_layout
from sweep.trials import TrialSeededSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True) * 1e3 + trial.suggest_int("unfreeze_layers", 0, 6)


def _params(make_sampler: Callable[[], optuna.samplers.BaseSampler], shares: list[int]) -> list[dict[str, object]]:
    """Run one study in several 'workers', each loading the study with a new sampler, and return every trial's parameters."""
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for count in shares:
        optuna.load_study(study_name="s", storage=storage, sampler=make_sampler()).optimize(_objective, n_trials=count)
    return [trial.params for trial in optuna.load_study(study_name="s", storage=storage).trials]


def test_sampling_independent_of_workers() -> None:
    # 14 trials: the 10 random start-up trials of TPE and 4 sampled from its model.
    one_worker = _params(lambda: TrialSeededSampler(optuna.samplers.TPESampler, 0), [14])
    three_workers = _params(lambda: TrialSeededSampler(optuna.samplers.TPESampler, 0), [3, 5, 6])
    assert len(one_worker) == 14
    assert one_worker == three_workers
    assert len({p["learning_rate"] for p in one_worker}) == 14


def test_plain_sampler_repeats_after_restart() -> None:
    # What the wrapper prevents: each new worker's sampler starts the same random sequence again.
    restarted = _params(lambda: optuna.samplers.TPESampler(seed=0), [3, 3])
    assert restarted[0] == restarted[3]
    seeded = _params(lambda: TrialSeededSampler(optuna.samplers.TPESampler, 0), [3, 3])
    assert seeded[0] != seeded[3]


def test_worker_layout() -> None:
    runtime = RuntimeSection
    assert worker_layout(runtime(), cpus=2, gpus=0) == (1, None)
    assert worker_layout(runtime(parallel="auto"), cpus=2, gpus=0) == (2, 1)
    assert worker_layout(runtime(parallel="auto"), cpus=16, gpus=0) == (4, 4)
    assert worker_layout(runtime(parallel="auto"), cpus=16, gpus=1) == (1, None)
    assert worker_layout(runtime(parallel=3), cpus=2, gpus=0) == (3, 1)
    assert worker_layout(runtime(parallel=4, workers="inline"), cpus=8, gpus=0) == (1, None)


def test_parallel_workers_stop_at_n_trials(tmp_path: Path, pneumonia_npz: Path) -> None:
    # Two workers, two trials to complete: once both are running, neither may start a third.
    config = tiny_config(tmp_path / "study", pneumonia_npz, study={"name": "parallel", "max_trials": 6})
    config["runtime"] = {"parallel": 2}
    result = run_sweep("run", str(write_yaml(tmp_path / "parallel.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running trials in 2 worker processes at once" in result.stderr
    study = optuna.load_study(study_name="parallel", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
