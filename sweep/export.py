"""Export of the best trial as a complete config that `sweep run` and `sweep train` load unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sklearn.metrics import roc_curve

from sweep.config import Config, config_from_dict, config_to_dict
from sweep.errors import SweepError
from sweep.report import PARAM_NAMES, load_study, rank_trials, read_table, started_config


def best_config(config: Config) -> Config:
    """Return the study's config with the best trial's hyperparameters fixed and its origin recorded.

    The exported study gets the name ``<name>-best`` and runs one trial, so
    running it does not continue the original study.
    """
    study = load_study(config)
    url = config.study.storage_url
    folds = read_table(url, "sweep_fold_results", config.study.name)
    table = rank_trials(study, folds, config.study.objective)
    ranked = table[table["rank"] == 1] if not table.empty else table
    if ranked.empty:
        raise SweepError(f"study '{config.study.name}' has no completed trial to export; run `sweep run` first")
    best = ranked.iloc[0]
    trial_number = int(best["trial"])
    trial_folds = folds[folds["trial_number"] == trial_number].sort_values("fold")
    objective = config.study.objective

    # The config stored when the study started is what its trials ran with,
    # whatever overrides this command was given.
    data: dict[str, Any] = started_config(config)
    ranges = data.get("search")
    data["search"] = {name: _plain(study.trials[trial_number].params[name]) for name in PARAM_NAMES}
    data["study"].update(name=f"{config.study.name}-best", dir=None, n_trials=1)
    if config.study.storage is None:
        data["study"]["storage"] = None
    data["origin"] = {
        "study": config.study.name,
        "trial": trial_number,
        "objective": objective,
        "cv_mean": float(best[f"val_{objective}_mean"]),
        "cv_std": float(best[f"val_{objective}_std"]),
        "best_epochs": [int(v) for v in trial_folds["best_epoch"]],
        "threshold": _cv_threshold(url, config.study.name, trial_number),
        "search": ranges,
    }
    return config_from_dict(data)


def export_best(config: Config, output: Path | None = None) -> tuple[Path, Config]:
    """Write the best config as YAML (default: <study dir>/best.yaml) and return the path and config."""
    exported = best_config(config)
    path = output or config.study.folder / "best.yaml"
    origin = exported.origin
    assert origin is not None
    header = (
        f"# Best configuration of study '{origin.study}': trial {origin.trial}, "
        f"cross-validated {origin.objective} {origin.cv_mean:.4f} ± {origin.cv_std:.4f}.\n"
        f"# `sweep run {path}` reruns it as study '{exported.study.name}'.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config_to_dict(exported), sort_keys=False), encoding="utf-8")
    return path, exported


def _cv_threshold(url: str, study_name: str, trial_number: int) -> float | None:
    """Return the threshold maximising sensitivity + specificity (Youden's J) on a binary trial's out-of-fold predictions."""
    predictions = read_table(url, "sweep_predictions", study_name)
    rows = predictions[predictions["trial_number"] == trial_number]
    if rows.empty:
        return None
    probabilities = np.array([json.loads(p) for p in rows["probabilities"]])
    if probabilities.shape[1] != 2 or len(set(rows["label"])) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(rows["label"].to_numpy(), probabilities[:, 1])
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
