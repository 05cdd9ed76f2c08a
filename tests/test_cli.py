"""End-to-end tests of the ``sweep`` command line, and its one-line errors for bad input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_sweep, tiny_config, write_yaml
from PIL import Image

from sweep.cli import main


def _count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as connection:
        return int(connection.execute(sql).fetchone()[0])


def test_run_leaves_trials_folds_and_epochs(tiny_study: Path) -> None:
    db = tiny_study.parent / "study" / "study.db"
    assert _count(db, "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'") == 2
    assert _count(db, "SELECT COUNT(*) FROM sweep_fold_results") == 4
    # 2 trials x 2 folds x (1 warm-up + 1 fine-tuning epoch)
    assert _count(db, "SELECT COUNT(*) FROM sweep_epochs") == 8
    assert _count(db, "SELECT COUNT(*) FROM sweep_fold_assignments") == 40
    assert _count(db, "SELECT COUNT(*) FROM sweep_epochs WHERE val_auc IS NULL OR train_loss IS NULL") == 0


def test_pruning_steps_are_fold_indices(tiny_study: Path) -> None:
    db = tiny_study.parent / "study" / "study.db"
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT trial_id, step FROM trial_intermediate_values ORDER BY trial_id, step").fetchall()
    steps: dict[int, list[int]] = {}
    for trial_id, step in rows:
        steps.setdefault(trial_id, []).append(step)
    assert len(steps) == 2
    for trial_steps in steps.values():
        assert trial_steps == [0, 1]


def test_run_again_continues_study(tiny_study: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(tiny_study.read_text())
    db = tiny_study.parent / "study" / "study.db"
    before = _count(db, "SELECT COUNT(*) FROM sweep_fold_results")
    result = run_sweep("run", str(tiny_study))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already has 2 completed trials" in result.stderr
    assert _count(db, "SELECT COUNT(*) FROM sweep_fold_results") == before
    assert config["study"]["n_trials"] == 2


def test_report_writes_files(tiny_study: Path) -> None:
    result = run_sweep("report", str(tiny_study))
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tiny_study.parent / "study"
    assert "rank" in result.stdout
    assert "val auc" in result.stdout
    markdown = (folder / "report.md").read_text()
    assert "| rank" in markdown
    assert "±" in markdown
    assert (folder / "report.csv").stat().st_size > 0
    png = (folder / "best_trial_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_export_then_run_round_trip(tiny_study: Path, tmp_path: Path) -> None:
    best = tmp_path / "best.yaml"
    result = run_sweep("export", str(tiny_study), "-o", str(best))
    assert result.returncode == 0, result.stderr[-2000:]
    exported = yaml.safe_load(best.read_text())
    assert exported["study"]["name"] == "tiny-best"
    assert set(exported["search"]) == {"learning_rate", "decay", "head_units", "dropout", "unfreeze_layers"}
    assert all(not isinstance(value, dict) for value in exported["search"].values())
    assert exported["origin"]["study"] == "tiny"
    assert len(exported["origin"]["best_epochs"]) == 2

    exported["study"]["dir"] = str(tmp_path / "best-study")
    rerun = run_sweep("run", str(write_yaml(tmp_path / "best-edited-dir.yaml", exported)))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    db = tmp_path / "best-study" / "study.db"
    assert _count(db, "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'") == 1
    with sqlite3.connect(db) as connection:
        params = dict(connection.execute("SELECT param_name, param_value FROM trial_params").fetchall())
    assert params["head_units"] == exported["search"]["head_units"]
    assert params["learning_rate"] == pytest.approx(exported["search"]["learning_rate"])


def test_best_yaml_runs_unedited(tiny_study: Path, tmp_path: Path) -> None:
    best = tmp_path / "best.yaml"
    assert run_sweep("export", str(tiny_study), "-o", str(best)).returncode == 0
    # Loading is what `sweep run` does first; a study dir of null means studies/tiny-best under the cwd.
    result = run_sweep("run", str(best), "study.n_trials=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "studies" / "tiny-best" / "study.db").is_file()


def _bad_npy(tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    return {"source": "npy", "path": str(tmp_path / "x.npy"), "labels_path": str(tmp_path / "y.npy"), "limit": None}


def _unreadable_folder(tmp_path: Path) -> dict[str, str]:
    for name in ("normal", "tumour"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40), 50 * i, dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "tumour" / "broken.png").write_bytes(b"not a png at all")
    return {"source": "folder", "path": str(tmp_path / "imgs"), "limit": None}


GOOD_IMAGES = np.random.default_rng(0).integers(0, 255, (12, 32, 32)).astype(np.uint8)
GOOD_LABELS = np.arange(12) % 2
NAN_IMAGES = GOOD_IMAGES.astype(np.float32)
NAN_IMAGES[3, 0, 0] = np.nan

BAD_CASES = {
    "unknown key": ({"cv": {"fold": 3}}, r"unknown config key 'cv.fold'; did you mean 'cv.folds'\?"),
    "wrong type": ({"cv": {"folds": "three"}}, r"cv.folds must be an integer, but got 'three'"),
    "folds below 2": ({"cv": {"folds": 1}}, r"cv.folds must be >= 2, but got 1"),
    "folds above smallest class": ({"cv": {"folds": 25}}, r"cv.folds must be >= 2 and <= the smallest class count \(10\), but got 25"),
    "range low above high": (
        {"search": {"dropout": {"low": 0.5, "high": 0.1}}},
        r"search.dropout: low must be <= high, but got low=0.5 and high=0.1",
    ),
    "non-positive learning rate": ({"search": {"learning_rate": {"low": 0.0, "high": 0.1}}}, r"search.learning_rate must be > 0.0, but got 0.0"),
    "unknown weights path": ({"model": {"weights": "/nowhere/vgg.h5"}}, r"model.weights must be 'imagenet', 'none' or an existing weights file"),
    "missing data file": ({"data": {"path": "/nowhere/pneumoniamnist.npz"}}, r"data file not found: '/nowhere/pneumoniamnist.npz'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_exits_2_with_one_line(case: str, tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sections, message = BAD_CASES[case]
    config = tiny_config(tmp_path / "study", pneumonia_npz, **sections)
    path = write_yaml(tmp_path / "bad.yaml", config)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("sweep: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "study").exists()


DATA_CASES = {
    "length mismatch": (lambda p: _bad_npy(p, GOOD_IMAGES, GOOD_LABELS[:10]), r"must have one label per image, but got 10 labels for 12 images"),
    "single class": (lambda p: _bad_npy(p, GOOD_IMAGES, np.zeros(12, dtype=int)), r"data must contain at least 2 classes, but all 12 labels are 0"),
    "nan pixels": (lambda p: _bad_npy(p, NAN_IMAGES, GOOD_LABELS), r"must have finite pixel values, but 1 images contain NaN or infinity \(first: index 3\)"),
    "unreadable image": (_unreadable_folder, r"data.path contains an unreadable image '.*broken.png'"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_exits_2_with_one_line(case: str, tmp_path: Path, pneumonia_npz: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_data, message = DATA_CASES[case]
    config = tiny_config(tmp_path / "study", pneumonia_npz, data=make_data(tmp_path))
    path = write_yaml(tmp_path / "bad.yaml", config)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "study").exists()


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "/nowhere/config.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "sweep: error: config file not found: '/nowhere/config.yaml'"


def test_yaml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("study:\n  name: [unclosed\ncv:\n  folds: 3\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"config file '{path}' is not valid YAML at line" in err


def test_bad_input_in_child_process_has_no_traceback(tmp_path: Path, pneumonia_npz: Path) -> None:
    config = tiny_config(tmp_path / "study", pneumonia_npz, cv={"folds": "three"})
    result = run_sweep("run", str(write_yaml(tmp_path / "bad.yaml", config)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "sweep: error: cv.folds must be an integer, but got 'three'"


def test_changed_data_rejected_without_changes(tiny_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tiny_study.parent / "study" / "study.db"
    before = db.read_bytes()
    assert main(["run", str(tiny_study), "data.limit=42"]) == 2
    assert "was started on other data" in capsys.readouterr().err
    assert db.read_bytes() == before


def test_multiclass_grouped_npy_run(tmp_path: Path, pneumonia_npz: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    images = (rng.integers(0, 80, (36, 32, 32)) + labels[:, None, None] * 80).astype(np.uint8)
    groups = np.repeat(np.arange(18), 2)  # two slices per patient, same label
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", np.eye(3)[labels])
    np.save(tmp_path / "g.npy", groups)
    data = {"source": "npy", "path": str(tmp_path / "x.npy"), "labels_path": str(tmp_path / "y.npy"), "groups_path": str(tmp_path / "g.npy"), "limit": None}
    config = tiny_config(tmp_path / "study", pneumonia_npz, data=data, study={"n_trials": 1}, cv={"folds": 3})
    result = run_sweep("run", str(write_yaml(tmp_path / "multi.yaml", config)))
    assert result.returncode == 0, result.stderr[-2000:]
    db = tmp_path / "study" / "study.db"
    with sqlite3.connect(db) as connection:
        aucs = [row[0] for row in connection.execute("SELECT val_auc FROM sweep_fold_results")]
        folds_per_group = connection.execute("SELECT group_id, COUNT(DISTINCT fold) FROM sweep_fold_assignments GROUP BY group_id").fetchall()
    assert len(aucs) == 3
    assert all(0.0 <= auc <= 1.0 for auc in aucs)
    assert len(folds_per_group) == 18
    assert all(count == 1 for _, count in folds_per_group)
