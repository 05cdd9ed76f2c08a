"""Tests for sweep.doctor: each check with a case that triggers it and one that does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_images, run_sweep, tiny_config, write_yaml
from PIL import Image

from sweep.config import config_from_dict
from sweep.data import Dataset, load_folder
from sweep.doctor import examine, prepare_dataset
from sweep.errors import SweepError
from sweep.folds import assign_folds, iter_folds


def _dataset(images: np.ndarray, labels: np.ndarray, **extra: object) -> Dataset:
    return Dataset(images=images, labels=labels, class_names=("normal", "tumour"), **extra)  # type: ignore[arg-type]


def _messages(report: object, check: str, level: str) -> list[str]:
    return [f.message for f in report.findings if f.check == check and f.level == level]  # type: ignore[attr-defined]


def test_sorted_labels_warn_about_validation_split() -> None:
    images, _ = make_images(100)
    labels = np.array([0] * 50 + [1] * 50)
    report = examine(_dataset(images, labels))
    (message,) = _messages(report, "label_order", "warning")
    assert "a Keras validation_split=0.2 on this array would validate on class 'tumour' only" in message
    assert report.summary["labels_sorted"] is True
    # sweep's own folds stay balanced on the same array.
    for _, _, val in iter_folds(assign_folds(labels, 5, seed=0)):
        assert np.sum(labels[val] == 0) == np.sum(labels[val] == 1)


def test_shuffled_labels_pass() -> None:
    images, labels = make_images(100)
    report = examine(_dataset(images, np.random.default_rng(0).permutation(labels)))
    assert _messages(report, "label_order", "warning") == []
    assert report.summary["labels_sorted"] is False


def test_imbalance_warns_with_majority_rate() -> None:
    images, _ = make_images(50)
    labels = np.array([0] * 10 + [1] * 40)
    report = examine(_dataset(images, np.random.default_rng(1).permutation(labels)))
    (message,) = _messages(report, "class_balance", "warning")
    assert "normal 10, tumour 40 (1:4.0, above 3:1)" in message
    assert "a model that predicts only 'tumour' scores accuracy 0.800" in message


def test_mild_imbalance_is_info() -> None:
    images, _ = make_images(40)
    labels = np.random.default_rng(2).permutation([0] * 15 + [1] * 25)
    report = examine(_dataset(images, labels))
    assert _messages(report, "class_balance", "warning") == []
    assert report.summary["imbalance_ratio"] == pytest.approx(25 / 15, abs=0.01)


def test_duplicates_found_and_kept_in_one_fold(tmp_path: Path) -> None:
    images, labels = make_images(40)
    images[7] = images[3]
    images[30] = images[3]
    labels[30] = labels[3]  # image 30 is even, so its label is set to match images 3 and 7 (odd, label 1)
    report = examine(_dataset(images, labels))
    (message,) = _messages(report, "duplicates", "warning")
    assert message.startswith("3 images are identical to another (1 groups, e.g. indices 3 and 7)")
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    config = config_from_dict({"data": {"source": "npy", "path": str(tmp_path / "x.npy"), "labels_path": str(tmp_path / "y.npy")}})
    dataset, _ = prepare_dataset(config)
    assignment = assign_folds(dataset.labels, 4, seed=0, clusters=dataset.clusters)
    assert len({assignment[3], assignment[7], assignment[30]}) == 1


def test_no_duplicates_is_info() -> None:
    images, labels = make_images(20)
    report = examine(_dataset(images, labels))
    assert _messages(report, "duplicates", "info") == ["no identical images"]
    assert report.summary["duplicate_images"] == 0


def test_conflicting_labels_error_or_drop(tmp_path: Path) -> None:
    images, labels = make_images(20)
    images[4] = images[5]  # 4 is even (label 0), 5 is odd (label 1)
    report = examine(_dataset(images, labels))
    (message,) = _messages(report, "duplicates", "error")
    assert "2 identical images carry different labels (e.g. indices 4, 5)" in message
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    data = {"source": "npy", "path": str(tmp_path / "x.npy"), "labels_path": str(tmp_path / "y.npy")}
    with pytest.raises(SweepError, match=r"^data check failed: 2 identical images carry different labels .*set data.on_conflict=drop"):
        prepare_dataset(config_from_dict({"data": data}))
    dataset, dropped = prepare_dataset(config_from_dict({"data": {**data, "on_conflict": "drop"}}))
    assert len(dataset) == 18
    assert _messages(dropped, "duplicates", "warning")[-1].endswith("all copies are dropped")


def test_patient_names_without_groups_warn(tmp_path: Path) -> None:
    for cls in ("normal", "tumour"):
        for patient in range(3):
            for slice_ in range(2):
                path = tmp_path / cls / f"P{patient + (10 if cls == 'tumour' else 0):02d}_{slice_}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((32, 32), 10 * patient + slice_ + (100 if cls == "tumour" else 0), np.uint8)).save(path)
    section = config_from_dict({"data": {"source": "folder", "path": str(tmp_path)}}).data
    (message,) = _messages(examine(load_folder(section)), "groups", "warning")
    assert "file names look like patient ids (6 ids such as 'P00' across 12 images)" in message
    assert "set data.group_by" in message
    grouped = load_folder(section.model_copy(update={"group_by": r"^(P\d+)_"}))
    assert _messages(examine(grouped), "groups", "info") == ["6 groups (patients); every fold keeps each group whole"]


def test_intensity_ranges() -> None:
    images, labels = make_images(20)
    assert "the 0-255 range" in _messages(examine(_dataset(images, labels)), "intensity", "info")[0]
    unit = examine(_dataset(images.astype(np.float32) / 255, labels))
    assert "scaled by 255" in _messages(unit, "intensity", "info")[0]
    raw = examine(_dataset(images.astype(np.float32) * 16, labels))
    (message,) = _messages(raw, "intensity", "warning")
    assert "raw intensities outside the 0-255 range" in message
    broken = images.astype(np.float32)
    broken[2, 0, 0] = np.inf
    (error,) = _messages(examine(_dataset(broken, labels)), "intensity", "error")
    assert error == "1 images contain NaN or infinite values (e.g. indices 2)"


def test_mixed_modes_warn(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("L", (32, 32), 5).save(tmp_path / "a" / "1.png")
    Image.new("RGB", (40, 40), (5, 6, 7)).save(tmp_path / "a" / "2.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(tmp_path / "b" / "3.png")
    Image.new("L", (32, 32), 9).save(tmp_path / "b" / "4.png")
    report = examine(load_folder(config_from_dict({"data": {"source": "folder", "path": str(tmp_path)}}).data))
    (message,) = _messages(report, "channels", "warning")
    assert message.startswith("image files of mixed modes (L 2, RGB 1, RGBA 1)")
    uniform = examine(_dataset(*make_images(10)))
    assert _messages(uniform, "channels", "warning") == []
    assert _messages(uniform, "channels", "info") == ["grayscale images, copied to three channels for VGG16"]


def test_pneumonia_summary(pneumonia_npz: Path) -> None:
    config = config_from_dict({"data": {"path": str(pneumonia_npz)}})
    from sweep.data import load_source

    report = examine(load_source(config.data))
    assert report.summary["images"] == 5232
    assert report.summary["imbalance_ratio"] == pytest.approx(2.88, abs=0.01)
    assert report.summary["duplicate_images"] == 50
    assert report.summary["duplicate_groups"] == 24
    assert report.errors == []


def test_doctor_command(tmp_path: Path, pneumonia_npz: Path) -> None:
    result = run_sweep("doctor", str(write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "study", pneumonia_npz))))
    assert result.returncode == 0, result.stderr
    # An explicit data.path gets numbered class names.
    assert "info: class balance: 0 1349, 1 3883 (1:2.9)" in result.stdout
    assert "warning: duplicates: 50 images are identical to another (24 groups" in result.stdout
    assert not (tmp_path / "study").exists()
