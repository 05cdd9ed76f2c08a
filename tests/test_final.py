"""Tests for sweep train and sweep predict: refit, saved model, preprocessing, test split, predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from conftest import make_images, run_sweep, tiny_config, write_yaml
from PIL import Image

from sweep.cli import main
from sweep.config import config_from_dict
from sweep.evaluation import bootstrap_auc, sensitivity_specificity
from sweep.final import final_epochs, final_hyperparameters, read_preprocessing, save_model, write_preprocessing
from sweep.model import HyperParameters
from sweep.predict import collect_inputs
from sweep.preprocess import prepare_images
from sweep.training import FoldData, FoldTrainer, InputSource, predict_proba


@pytest.fixture(scope="module")
def split_npz(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Path:
    """A small MedMNIST-layout file with a test split, cut from the bundled PneumoniaMNIST images."""
    with np.load(pneumonia_npz) as archive:
        images = archive["train_images"]
        labels = archive["train_labels"]
    rng = np.random.default_rng(0)
    normal = rng.choice(np.flatnonzero(labels[:, 0] == 0), 30, replace=False)
    pneumonia = rng.choice(np.flatnonzero(labels[:, 0] == 1), 30, replace=False)
    train = np.r_[normal[:15], pneumonia[:15]]
    val = np.r_[normal[15:20], pneumonia[15:20]]
    test = np.r_[normal[20:], pneumonia[20:]]
    path = tmp_path_factory.mktemp("split") / "pneumoniamnist.npz"
    np.savez(
        path,
        train_images=images[train],
        train_labels=labels[train],
        val_images=images[val],
        val_labels=labels[val],
        test_images=images[test],
        test_labels=labels[test],
    )
    return path


@pytest.fixture(scope="module")
def best_yaml(tmp_path_factory: pytest.TempPathFactory, split_npz: Path) -> Path:
    folder = tmp_path_factory.mktemp("final-study")
    config = tiny_config(folder / "studies" / "tiny", split_npz, data={"limit": None})
    config["study"]["dir"] = None
    path = write_yaml(folder / "tiny.yaml", config)
    assert run_sweep("run", str(path), cwd=folder).returncode == 0
    assert run_sweep("export", str(path), cwd=folder).returncode == 0
    return folder / "studies" / "tiny" / "best.yaml"


def test_train_end_to_end(best_yaml: Path) -> None:
    folder = best_yaml.parents[2]
    result = run_sweep("train", str(best_yaml), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    final = folder / "studies" / "tiny" / "final"
    expected = ["model.keras", "preprocessing.json", "history.csv", "learning_curves.png"]
    expected += ["test_metrics.json", "report.md", "test_confusion.png", "test_roc.png"]
    for name in expected:
        assert (final / name).is_file(), name
    metrics = json.loads((final / "test_metrics.json").read_text())
    assert metrics["n_images"] == 20
    low, high = metrics["auc_ci95"]
    assert low <= metrics["auc"] <= high
    assert set(metrics["thresholds"]) == {"0.5", "cv"}
    assert sum(map(sum, metrics["confusion_matrix"])) == 20
    history = (final / "history.csv").read_text().splitlines()
    exported = yaml.safe_load(best_yaml.read_text())
    assert len(history) == 1 + 1 + final_epochs(config_from_dict(exported))
    report = (final / "report.md").read_text()
    assert "Cross-validation estimate (study 'tiny'" in report
    assert "Test split (20 images, scored once)" in report


def test_test_split_read_only_after_refit(best_yaml: Path, split_npz: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reads: list[tuple[str, bool]] = []
    original = np.lib.npyio.NpzFile.__getitem__
    output = tmp_path / "final"

    def spy(self: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
        reads.append((key, (output / "model.keras").exists()))
        return original(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    config = tiny_config(tmp_path / "study", split_npz, data={"limit": None}, study={"n_trials": 1})
    config["runtime"] = {"workers": "inline"}
    assert main(["run", str(write_yaml(tmp_path / "c.yaml", config))]) == 0
    assert reads and not any(key.startswith("test_") for key, _ in reads)

    reads.clear()
    monkeypatch.chdir(best_yaml.parents[2])
    assert main(["train", str(best_yaml), "-o", str(output)]) == 0
    test_reads = [saved for key, saved in reads if key.startswith("test_")]
    assert test_reads == [True, True]


def test_saved_model_predicts_like_in_memory(tmp_path: Path) -> None:
    images, labels = make_images(24)
    prepared = prepare_images(images, 32)
    config = config_from_dict({"train": {"warmup_epochs": 1, "epochs": 1, "batch_size": 8}, "model": {"weights": "none"}})
    params = HyperParameters(learning_rate=1e-4, decay=0.0, head_units=8, dropout=0.2, unfreeze_layers=2)
    trainer = FoldTrainer(config, params, InputSource(lambda: prepared), 2, None, seed=0)
    trainer.train(FoldData(np.arange(24), np.zeros(0, dtype=np.int64), labels), seed=0)
    model = trainer.model
    save_model(model, tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert (tmp_path / "model.keras").stat().st_size < 1.2 * sum(w.nbytes for w in model.get_weights())
    index = np.arange(24)
    assert np.array_equal(predict_proba(model, prepared, index), predict_proba(reloaded, prepared, index))


def test_preprocessing_round_trip(tmp_path: Path) -> None:
    write_preprocessing(tmp_path, 48, ("normal", "tumour"))
    spec = read_preprocessing(tmp_path)
    assert spec["input_size"] == 48
    assert spec["class_names"] == ["normal", "tumour"]
    assert spec["function"] == "keras.applications.vgg16.preprocess_input"


def test_predict_many_formats(best_yaml: Path, tmp_path: Path) -> None:
    folder = best_yaml.parents[2]
    model_dir = folder / "studies" / "tiny" / "final"
    if not (model_dir / "model.keras").exists():
        assert run_sweep("train", str(best_yaml), cwd=folder).returncode == 0
    gray = np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]), mode="RGBA").save(tmp_path / "rgba.png")
    np.save(tmp_path / "one.npy", gray)
    np.save(tmp_path / "stack.npy", np.stack([gray, 255 - gray]))
    (tmp_path / "folder").mkdir()
    Image.fromarray(gray).resize((64, 64)).save(tmp_path / "folder" / "big.png")
    inputs = [str(tmp_path / n) for n in ("gray.png", "rgb.jpg", "rgba.png", "one.npy", "stack.npy", "folder")]
    out = tmp_path / "predictions.csv"
    result = run_sweep("predict", str(model_dir), *inputs, "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["image"]).name for r in rows] == ["gray.png", "rgb.jpg", "rgba.png", "one.npy", "stack.npy[0]", "stack.npy[1]", "big.png"]
    for row in rows:
        # The data came from an explicit data.path, so its classes are named by index.
        assert float(row["p_0"]) + float(row["p_1"]) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] in ("0", "1")
    by_name = {Path(r["image"]).name: float(r["p_1"]) for r in rows}
    # The same pixels as PNG, RGBA and .npy give the same prediction; JPEG is lossy.
    assert by_name["gray.png"] == pytest.approx(by_name["rgba.png"], abs=1e-6)
    assert by_name["gray.png"] == pytest.approx(by_name["one.npy"], abs=1e-6)
    assert by_name["gray.png"] == pytest.approx(by_name["stack.npy[0]"], abs=1e-6)
    assert by_name["gray.png"] == pytest.approx(by_name["rgb.jpg"], abs=0.05)


def test_collect_inputs_missing_file() -> None:
    from sweep.errors import SweepError

    with pytest.raises(SweepError, match=r"image input not found: '/nowhere.png'"):
        collect_inputs(["/nowhere.png"])


def test_train_rejects_ranges_and_out_of_range(tmp_path: Path, best_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exported = yaml.safe_load(best_yaml.read_text())
    ranged = dict(exported, search={**exported["search"], "dropout": {"low": 0.0, "high": 0.5}})
    assert main(["train", str(write_yaml(tmp_path / "r.yaml", ranged))]) == 2
    assert "search.dropout must be a single value to train a final model, but got a range" in capsys.readouterr().err
    outside = dict(exported, search={**exported["search"], "head_units": 4096})
    assert main(["train", str(write_yaml(tmp_path / "o.yaml", outside))]) == 2
    assert "search.head_units must lie in the study's range [8, 32], but got 4096" in capsys.readouterr().err


def test_final_hyperparameters_and_epochs() -> None:
    config = config_from_dict(
        {
            "search": {"learning_rate": 1e-4, "decay": 0.0, "head_units": 64, "dropout": 0.1, "unfreeze_layers": 2},
            "origin": {"study": "s", "trial": 3, "objective": "auc", "cv_mean": 0.9, "cv_std": 0.01, "best_epochs": [2, 5, 3]},
        }
    )
    assert final_hyperparameters(config).head_units == 64
    assert final_epochs(config) == 3
    assert final_epochs(config.model_copy(update={"train": config.train.model_copy(update={"final_epochs": 7})})) == 7


def test_bootstrap_interval_contains_estimate() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    probabilities = np.c_[1 - scores, scores]
    from sklearn.metrics import roc_auc_score

    low, high = bootstrap_auc(labels, probabilities)
    assert low < roc_auc_score(labels, scores) < high
    assert 0.5 < low < high < 1.0


def test_sensitivity_specificity() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    probability = np.array([0.9, 0.6, 0.2, 0.4, 0.7])
    assert sensitivity_specificity(labels, probability, 0.5) == pytest.approx((2 / 3, 1 / 2))
    assert sensitivity_specificity(labels, probability, 0.1) == pytest.approx((1.0, 0.0))
