"""Tests for sweep.trials: sampling that does not depend on which worker process runs a trial."""

from __future__ import annotations

from collections.abc import Callable

import optuna

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
