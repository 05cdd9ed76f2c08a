"""Tests for sweep.data: each loader, label forms, subsampling and rejected data."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images
from PIL import Image

from sweep.config import DataSection, config_from_dict
from sweep.data import load_dataset, load_folder, load_medmnist, load_npy, medmnist_path, stratified_subsample, to_class_indices
from sweep.errors import SweepError


def test_medmnist_loads_train_and_val(pneumonia_npz: Path) -> None:
    dataset = load_medmnist(DataSection(source="medmnist", path=str(pneumonia_npz)))
    assert len(dataset) == 4708 + 524
    assert dataset.images.shape == (5232, 28, 28)
    assert np.bincount(dataset.labels).tolist() == [1214 + 135, 3494 + 389]


def test_medmnist_class_names_from_root(pneumonia_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEP_DATA_DIR", str(pneumonia_npz.parent))
    section = DataSection(source="medmnist", name="pneumoniamnist", root="elsewhere")
    assert medmnist_path(section) == pneumonia_npz
    assert load_medmnist(section).class_names == ("normal", "pneumonia")


def test_medmnist_test_split_is_not_loaded(tmp_path: Path) -> None:
    images, labels = make_images(20)
    path = tmp_path / "set.npz"
    np.savez(
        path,
        train_images=images[:16],
        train_labels=labels[:16, None],
        val_images=images[16:],
        val_labels=labels[16:, None],
        test_images=np.zeros((5, 32, 32), np.uint8),
        test_labels=np.zeros((5, 1)),
    )
    dataset = load_medmnist(DataSection(source="medmnist", path=str(path)))
    assert len(dataset) == 20


def test_medmnist_missing_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path))
    section = DataSection(source="medmnist", name="pneumoniamnist", download=False)
    with pytest.raises(SweepError, match=r"data file not found: '.*pneumoniamnist.npz' \(data.download is false\); put the file there or set SWEEP_DATA_DIR"):
        load_medmnist(section)


def test_medmnist_unknown_name_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path))
    with pytest.raises(SweepError, match=r"no download is known for 'mrimnist'"):
        load_medmnist(DataSection(source="medmnist", name="mrimnist"))


def test_medmnist_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((4, 8, 8)))
    with pytest.raises(SweepError, match=r"must contain MedMNIST keys train_images and train_labels"):
        load_medmnist(DataSection(source="medmnist", path=str(path)))


@pytest.mark.parametrize("form", ["int", "column", "onehot", "float"])
def test_npy_label_forms(form: str, tmp_path: Path) -> None:
    images, labels = make_images(10)
    raw = {"int": labels, "column": labels[:, None], "onehot": np.eye(2)[labels], "float": labels.astype(float)}[form]
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", raw)
    dataset = load_npy(DataSection(source="npy", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy")))
    assert dataset.labels.tolist() == labels.tolist()
    assert dataset.class_names == ("0", "1")


def test_npy_groups(tmp_path: Path) -> None:
    images, labels = make_images(10)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "g.npy", np.arange(10) // 2)
    section = DataSection(source="npy", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy"), groups_path=str(tmp_path / "g.npy"))
    assert load_npy(section).groups.tolist() == (np.arange(10) // 2).tolist()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.array([[1, 1], [0, 1]]), r"must be integer class indices or one-hot rows"),
        (np.array([0.5, 1.0]), r"must be integer class indices, but got dtype float64"),
        (np.array([-1, 1]), r"must be >= 0, but got -1"),
        (np.array([0, 1, 1]), r"must have one label per image, but got 3 labels for 2 images"),
    ],
)
def test_bad_labels(raw: np.ndarray, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        to_class_indices(raw, "data.labels_path", n_images=2)


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_folder_reads_any_mode_and_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _save(tmp_path / "normal" / "p01_a.png", Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)))
    _save(tmp_path / "normal" / "p02_b.jpg", Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    _save(tmp_path / "tumour" / "p03_c.png", Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), mode="RGBA"))
    _save(tmp_path / "tumour" / "p03_d.png", Image.fromarray(rng.integers(0, 255, (33, 33, 3), dtype=np.uint8)).convert("P"))
    section = DataSection(source="folder", path=str(tmp_path), group_by=r"^(p\d+)_")
    dataset = load_folder(section)
    assert dataset.class_names == ("normal", "tumour")
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert [image.shape for image in dataset.images] == [(40, 50), (64, 64, 3), (30, 30, 3), (33, 33, 3)]
    assert dataset.groups.tolist() == ["p01", "p02", "p03", "p03"]


def test_folder_unreadable_image(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "ok.png", Image.new("L", (32, 32)))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(SweepError, match=r"data.path contains an unreadable image '.*bad.jpg'"):
        load_folder(DataSection(source="folder", path=str(tmp_path)))


def test_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"data.path folder not found"):
        load_folder(DataSection(source="folder", path=str(tmp_path / "none")))


def test_limit_keeps_class_ratio(pneumonia_npz: Path) -> None:
    config = config_from_dict({"data": {"path": str(pneumonia_npz), "limit": 300}, "study": {"seed": 3}})
    dataset = load_dataset(config)
    assert len(dataset) == 300
    ratio = np.mean(dataset.labels)
    assert abs(ratio - (3494 + 389) / 5232) < 1 / 300 + 1e-9
    again = load_dataset(config)
    assert np.array_equal(again.images, dataset.images)


def test_subsample_depends_on_seed() -> None:
    images, labels = make_images(100)
    from sweep.data import Dataset

    dataset = Dataset(images=images, labels=labels, class_names=("a", "b"))
    first = stratified_subsample(dataset, 20, seed=0)
    second = stratified_subsample(dataset, 20, seed=1)
    assert not np.array_equal(first.images, second.images)


def test_fingerprint_changes_with_labels() -> None:
    from sweep.data import Dataset

    images, labels = make_images(10)
    a = Dataset(images=images, labels=labels, class_names=("a", "b"))
    b = Dataset(images=images, labels=1 - labels, class_names=("a", "b"))
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == Dataset(images=images.copy(), labels=labels.copy(), class_names=("a", "b")).fingerprint()


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(pneumonia_npz: Path) -> Iterator[str]:
    """Serve the bundled PneumoniaMNIST file over HTTP on 127.0.0.1, standing in for MedMNIST's record."""
    _Handler.body = pneumonia_npz.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_medmnist_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: str) -> None:
    # The bundled file's images are reordered, so its MD5 differs from the official file's.
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SWEEP_MEDMNIST_URL", mirror + "/{name}.npz")
    with pytest.raises(SweepError, match=r"the download from http://127.0.0.1:\d+/pneumoniamnist.npz has MD5 \w+ instead of 28209eda62fecd6e6a2d98b1501bb15f"):
        load_medmnist(DataSection(source="medmnist", name="pneumoniamnist"))
    assert list(tmp_path.iterdir()) == []


def test_medmnist_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: str) -> None:
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SWEEP_MEDMNIST_URL", mirror + "/missing/{name}.npz")
    with pytest.raises(
        SweepError, match=r"^data file not found: '.*pneumoniamnist.npz', and the download from .* failed \(HTTP Error 404.*put the file there"
    ) as info:
        load_medmnist(DataSection(source="medmnist", name="pneumoniamnist"))
    assert "\n" not in str(info.value)


def test_medmnist_download_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirror: str, pneumonia_npz: Path) -> None:
    from sweep import medmnist_info

    digest = hashlib.md5(pneumonia_npz.read_bytes()).hexdigest()
    monkeypatch.setitem(medmnist_info.DATASETS, "pneumoniamnist", medmnist_info.MedMnistSet(digest, ("normal", "pneumonia")))
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SWEEP_MEDMNIST_URL", mirror + "/{name}.npz")
    dataset = load_medmnist(DataSection(source="medmnist", name="pneumoniamnist"))
    assert len(dataset) == 5232
    assert (tmp_path / "pneumoniamnist.npz").read_bytes() == pneumonia_npz.read_bytes()
