"""Ranking of a study's trials with pandas, written as Markdown, CSV and a learning-curve plot."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState
from sqlalchemy import create_engine, text

from sweep.config import Config, config_from_dict, config_to_dict
from sweep.errors import SweepError
from sweep.health import is_disqualified
from sweep.store import METRICS, Store

logger = logging.getLogger(__name__)

PARAM_NAMES = ("learning_rate", "decay", "head_units", "dropout", "unfreeze_layers")


@dataclass(frozen=True)
class PruningSavings:
    """Training that pruned trials did not do."""

    pruned: int  # number of pruned trials
    folds_run: int  # folds the pruned trials trained before they stopped
    folds_skipped: int  # folds they would have trained to completion
    epochs_skipped: int  # folds_skipped x epochs per fold
    seconds_saved: float  # folds_skipped x the mean duration of a trained fold (an estimate)


def pruning_savings(table: pd.DataFrame, folds: pd.DataFrame, n_folds: int, epochs_per_fold: int) -> PruningSavings:
    """Count the folds and epochs that pruning saved, and estimate the time from the mean fold duration."""
    pruned = table[table["state"] == TrialState.PRUNED.name]
    folds_run = int(pruned["folds"].sum())
    skipped = len(pruned) * n_folds - folds_run
    mean_fold_s = float(folds["duration_s"].mean()) if len(folds) else 0.0
    return PruningSavings(len(pruned), folds_run, skipped, skipped * epochs_per_fold, skipped * mean_fold_s)


@dataclass(frozen=True)
class Report:
    """A ranked table of trials and the files written from it."""

    table: pd.DataFrame
    markdown_path: Path
    csv_path: Path
    curves_path: Path | None


def load_study(config: Config) -> optuna.Study:
    """Open the configured study, raising SweepError when it does not exist yet."""
    url = config.study.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise SweepError(f"study database not found: '{url.removeprefix('sqlite:///')}'; run `sweep run` with this config first")
    try:
        return optuna.load_study(study_name=config.study.name, storage=url)
    except KeyError as err:
        raise SweepError(f"study.name '{config.study.name}' not found in {url}; run `sweep run` with this config first") from err


def read_table(url: str, table: str, study_name: str) -> pd.DataFrame:
    """Read one sweep table of a study into a DataFrame."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return pd.read_sql(text(f"SELECT * FROM {table} WHERE study_name = :name"), connection, params={"name": study_name})
    finally:
        engine.dispose()


def rank_trials(study: optuna.Study, folds: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Rank trials by the objective's mean over folds; ties go to the lower standard deviation.

    Completed trials come first, ranked, with collapsed or diverged ones below
    every healthy one; pruned, failed and running trials follow
    without a rank. Every metric appears as mean and standard deviation over the
    trial's folds.
    """
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row: dict[str, object] = {"trial": trial.number, "state": trial.state.name}
        row.update({name: trial.params.get(name) for name in PARAM_NAMES})
        trial_folds = folds[folds["trial_number"] == trial.number]
        for split in ("val", "train"):
            for metric in METRICS:
                column = trial_folds[f"{split}_{metric}"] if len(trial_folds) else pd.Series(dtype=float)
                row[f"{split}_{metric}_mean"] = column.mean() if len(column) else math.nan
                row[f"{split}_{metric}_std"] = column.std(ddof=0) if len(column) else math.nan
        row["folds"] = len(trial_folds)
        row["health"] = trial.user_attrs.get("health", "")
        row["fail_reason"] = trial.user_attrs.get("fail_reason", "")
        row["precision"] = trial.user_attrs.get("precision", "")
        row["feature_cache"] = trial.user_attrs.get("feature_cache", "")
        row["epochs_run"] = int(trial_folds["epochs_run"].sum()) if len(trial_folds) else 0
        row["duration_s"] = trial.duration.total_seconds() if trial.duration else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    ascending = objective == "loss"
    key = f"val_{objective}_mean"
    table["disqualified"] = [is_disqualified(str(h)) for h in table["health"]]
    # Collapsed and diverged trials rank below every healthy one, whatever their score.
    complete = table[table["state"] == TrialState.COMPLETE.name].sort_values(
        ["disqualified", key, f"val_{objective}_std", "trial"], ascending=[True, ascending, True, True], na_position="last"
    )
    complete.insert(0, "rank", range(1, len(complete) + 1))
    others = table[table["state"] != TrialState.COMPLETE.name].sort_values("trial")
    others.insert(0, "rank", [pd.NA] * len(others))
    return pd.concat([complete, others], ignore_index=True)


def build_report(config: Config) -> Report:
    """Rank the study's trials and write report.md, report.csv and the best trial's learning curves."""
    study = load_study(config)
    # Folds, epochs, pruner and objective come from the stored config, not from this command's overrides.
    ran = config_from_dict(started_config(config))
    config = config.model_copy(
        update={"cv": ran.cv, "train": ran.train, "study": config.study.model_copy(update={"pruner": ran.study.pruner, "objective": ran.study.objective})}
    )
    url = config.study.storage_url
    folds = read_table(url, "sweep_fold_results", config.study.name)
    table = rank_trials(study, folds, config.study.objective)
    if table.empty:
        raise SweepError(f"study '{config.study.name}' has no trials yet; run `sweep run` first")
    folder = config.study.folder
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / "report.csv"
    table.to_csv(csv_path, index=False)
    curves_path = None
    best = table[table["rank"] == 1]
    if len(best):
        from sweep.plots import plot_learning_curves

        epochs = read_table(url, "sweep_epochs", config.study.name)
        trial_number = int(best["trial"].iloc[0])
        curves_path = plot_learning_curves(epochs[epochs["trial_number"] == trial_number], trial_number, folder / "best_trial_curves.png")
    markdown_path = folder / "report.md"
    savings = pruning_savings(table, folds, config.cv.folds, config.train.warmup_epochs + config.train.epochs)
    extra = _data_check_lines(url, config.study.name) + _confusion_lines(folds, table, url, config.study.name)
    markdown_path.write_text(_markdown(config, table, curves_path, savings) + "\n" + "\n".join(extra), encoding="utf-8")
    return Report(table=table, markdown_path=markdown_path, csv_path=csv_path, curves_path=curves_path)


def summary_table(table: pd.DataFrame, objective: str, top: int | None = None) -> pd.DataFrame:
    """Return the human-readable columns: rank, trial, state, parameters and mean ± std of each metric."""
    shown = table.head(top) if top else table
    out = pd.DataFrame({"rank": shown["rank"], "trial": shown["trial"], "state": shown["state"]})
    formats = {"learning_rate": "{:.2e}", "decay": "{:.2e}", "head_units": "{:.0f}", "dropout": "{:.2f}", "unfreeze_layers": "{:.0f}"}
    for name, fmt in formats.items():
        out[name] = [fmt.format(v) if v is not None and not _isnan(v) else "" for v in shown[name]]
    ordered = [objective] + [m for m in METRICS if m != objective]
    for metric in ordered:
        out[f"val {metric}"] = [_pm(m, s) for m, s in zip(shown[f"val_{metric}_mean"], shown[f"val_{metric}_std"], strict=True)]
    out["train auc"] = [_pm(m, s) for m, s in zip(shown["train_auc_mean"], shown["train_auc_std"], strict=True)]
    out["health"] = [str(h) if h else "" for h in shown["health"]]
    out["folds"] = shown["folds"]
    out["epochs"] = shown["epochs_run"]
    out["duration (s)"] = [f"{v:.0f}" if not _isnan(v) else "" for v in shown["duration_s"]]
    out["rank"] = [str(int(r)) if not pd.isna(r) else "-" for r in out["rank"]]
    return out


def _markdown(config: Config, table: pd.DataFrame, curves_path: Path | None, savings: PruningSavings) -> str:
    objective = config.study.objective
    counts = table["state"].value_counts()
    caches = sorted({str(v) for v in table["feature_cache"] if v})
    precisions = sorted({str(v) for v in table["precision"] if v})
    lines = [
        f"# Study {config.study.name}",
        "",
        f"Objective: mean validation {objective} over {config.cv.folds} folds "
        f"({'lower' if objective == 'loss' else 'higher'} is better; ties go to the lower standard deviation).",
        "States: " + ", ".join(f"{str(state).lower()} {count}" for state, count in counts.items()) + ".",
        f"Pruning ({config.study.pruner}): {savings.pruned} trials pruned after {savings.folds_run} folds, "
        f"saving {savings.folds_skipped} folds ({savings.epochs_skipped} epochs, about {savings.seconds_saved / 60:.1f} min at the mean fold time).",
        f"Feature cache: {', '.join(caches) or 'not recorded'}. Precision: {', '.join(precisions) or 'not recorded'}.",
        "",
        summary_table(table, objective).to_markdown(index=False, disable_numparse=True),
        "",
    ]
    if curves_path is not None:
        lines += [f"Learning curves of the best trial: ![curves]({curves_path.name})", ""]
    return "\n".join(lines)


def started_config(config: Config) -> dict[str, Any]:
    """Return the config stored when the study started (what its trials ran with), or this one before any run."""
    store = Store(config.study.storage_url)
    try:
        stored = store.load_assignment(config.study.name)
    finally:
        store.dispose()
    if stored is None:
        return config_to_dict(config)
    data = yaml.safe_load(stored[0].config_yaml)
    return data if isinstance(data, dict) else config_to_dict(config)


def _data_check_lines(url: str, study_name: str) -> list[str]:
    studies = read_table(url, "sweep_studies", study_name)
    if studies.empty or not studies["doctor_json"].iloc[0]:
        return []
    findings = json.loads(studies["doctor_json"].iloc[0])["findings"]
    lines = ["## Data check", ""]
    lines += [f"- {f['level']}: {f['check'].replace('_', ' ')}: {f['message']}" for f in findings]
    return [*lines, ""]


def _confusion_lines(folds: pd.DataFrame, table: pd.DataFrame, url: str, study_name: str) -> list[str]:
    best = table[table["rank"] == 1]
    if best.empty or "confusion" not in folds:
        return []
    trial_number = int(best["trial"].iloc[0])
    studies = read_table(url, "sweep_studies", study_name)
    names = str(studies["class_names"].iloc[0]).split("\n") if not studies.empty else []
    lines = [f"## Confusion matrices of trial {trial_number} (rows: true class, columns: predicted)", ""]
    for _, row in folds[folds["trial_number"] == trial_number].sort_values("fold").iterrows():
        if not row["confusion"]:
            continue
        matrix = json.loads(row["confusion"])
        labels = names if len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
        frame = pd.DataFrame(matrix, index=labels, columns=labels)
        lines += [f"Fold {int(row['fold']) + 1}:", "", frame.to_markdown(), ""]
    return lines


def _pm(mean: float, std: float) -> str:
    if _isnan(mean):
        return ""
    return f"{mean:.4f} ± {std:.4f}"


def _isnan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)
