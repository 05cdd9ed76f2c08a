"""Loading labelled images from a MedMNIST file, NumPy arrays or class folders.

Loaders return only the images used for cross-validation. A MedMNIST test
split stays unread in its file so that no sweep can look at it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from sweep.config import Config, DataSection
from sweep.errors import SweepError
from sweep.medmnist_info import DATASETS, RECORD_URL

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class Dataset:
    """Labelled images for cross-validation.

    Attributes:
        images: One array per image, (H, W) or (H, W, C); a single stacked array when all shapes agree.
        labels: Integer class index per image, shape (N,).
        class_names: Class names in label order.
        groups: Group (patient) id per image, or None when the data has no groups.
        origin: Where the images came from, for messages.
    """

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray | None = None
    origin: str = ""
    names: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)  # PIL mode of each file, for folder data
    clusters: np.ndarray | None = None  # index of the first identical image, per image

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Return a SHA-256 of the images, labels and groups, to detect changed data."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.labels).tobytes())
        if self.groups is not None:
            digest.update(np.asarray(self.groups).astype(str).tobytes())
        images = [self.images] if isinstance(self.images, np.ndarray) else self.images
        for image in images:
            digest.update(str(image.shape).encode())
            digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()

    def subset(self, indices: np.ndarray) -> Dataset:
        """Return the images at ``indices``, in that order."""
        if isinstance(self.images, np.ndarray):
            images: np.ndarray | list[np.ndarray] = self.images[indices]
        else:
            images = [self.images[i] for i in indices]
        return Dataset(
            images=images,
            labels=self.labels[indices],
            class_names=self.class_names,
            groups=None if self.groups is None else self.groups[indices],
            origin=self.origin,
            names=[self.names[i] for i in indices] if self.names else [],
            modes=[self.modes[i] for i in indices] if self.modes else [],
            clusters=None if self.clusters is None else self.clusters[indices],
        )


def load_dataset(config: Config) -> Dataset:
    """Load, check and subsample the cross-validation images the config names.

    Raises:
        SweepError: The data is missing, unreadable or unusable; the message names the field.
    """
    dataset = load_source(config.data)
    check_dataset(dataset)
    return limit_dataset(dataset, config)


def load_source(section: DataSection) -> Dataset:
    """Load the images and labels of ``data.source`` without any check."""
    if section.source == "medmnist":
        return load_medmnist(section)
    if section.source == "npy":
        return load_npy(section)
    return load_folder(section)


def limit_dataset(dataset: Dataset, config: Config) -> Dataset:
    """Apply ``data.limit``: a stratified subsample drawn with study.seed."""
    section = config.data
    if section.limit is not None and section.limit < len(dataset):
        dataset = stratified_subsample(dataset, section.limit, config.study.seed)
        check_dataset(dataset)
    logger.debug("loaded %d images of %d classes from %s", len(dataset), dataset.n_classes, dataset.origin)
    return dataset


def load_test_split(section: DataSection, class_names: tuple[str, ...]) -> Dataset | None:
    """Load the held-out test images, or return None when the data has none.

    Only ``sweep train`` calls this, once, after the final model is trained; no
    sweep or refit reads the test split before that.
    """
    if section.source == "medmnist":
        path = medmnist_path(section)
        with np.load(path, allow_pickle=False) as archive:
            if "test_images" not in archive.files or "test_labels" not in archive.files:
                return None
            images, raw = archive["test_images"], archive["test_labels"]
        labels = to_class_indices(raw, field_name="test_labels", n_images=len(images))
        return Dataset(images=images, labels=labels, class_names=class_names, origin=f"{path} (test split)")
    if not section.test_path:
        return None
    if section.source == "npy":
        if not section.test_labels_path:
            raise SweepError("data.test_labels_path is required when data.test_path is set for data.source 'npy', but got null")
        images = _load_array(section.test_path, "data.test_path")
        labels = to_class_indices(_load_array(section.test_labels_path, "data.test_labels_path"), field_name="data.test_labels_path", n_images=len(images))
        return Dataset(images=images, labels=labels, class_names=class_names, origin=section.test_path)
    test = load_folder(section.model_copy(update={"path": section.test_path, "class_names": list(class_names), "group_by": None}))
    return test


def medmnist_path(section: DataSection) -> Path:
    """Return where the MedMNIST file is expected: data.path, else <root>/<name>.npz (root from SWEEP_DATA_DIR when set)."""
    if section.path:
        return Path(section.path)
    root = os.environ.get("SWEEP_DATA_DIR") or section.root
    return Path(root) / f"{section.name}.npz"


def load_medmnist(section: DataSection) -> Dataset:
    """Load the train and validation splits of a MedMNIST ``.npz`` together."""
    path = medmnist_path(section)
    if not path.is_file():
        _download_medmnist(section, path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SweepError(f"data.path '{path}' is not a readable .npz file: {err}") from err
    with archive:
        missing = [key for key in ("train_images", "train_labels") if key not in archive.files]
        if missing:
            raise SweepError(f"data.path '{path}' must contain MedMNIST keys train_images and train_labels, but lacks {', '.join(missing)}")
        parts = ["train"] + (["val"] if "val_images" in archive.files else [])
        images = np.concatenate([archive[f"{part}_images"] for part in parts])
        raw_labels = np.concatenate([archive[f"{part}_labels"] for part in parts])
    labels = to_class_indices(raw_labels, field_name="data.path labels", n_images=len(images))
    known = DATASETS.get(section.name)
    names = section.class_names or (list(known.class_names) if known and not section.path else None)
    return Dataset(images=images, labels=labels, class_names=_class_names(names, labels, "data.class_names"), origin=str(path))


def _download_medmnist(section: DataSection, path: Path) -> None:
    known = DATASETS.get(section.name)
    where = "put the file there or set SWEEP_DATA_DIR to its folder"
    if section.path or not section.download or known is None:
        reason = "data.download is false" if not section.download else f"no download is known for '{section.name}'"
        if section.path:
            reason = "data.path is set explicitly"
        raise SweepError(f"data file not found: '{path}' ({reason}); {where}")
    # SWEEP_MEDMNIST_URL points at a mirror; the MD5 check below still applies.
    url = os.environ.get("SWEEP_MEDMNIST_URL", RECORD_URL).format(name=section.name)
    logger.debug("downloading %s to %s", url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
        digest = hashlib.md5(partial.read_bytes()).hexdigest()
        if digest != known.md5:
            raise SweepError(f"data file not found: '{path}', and the download from {url} has MD5 {digest} instead of {known.md5}; {where}")
        os.replace(partial, path)
    except (urllib.error.URLError, OSError) as err:
        raise SweepError(f"data file not found: '{path}', and the download from {url} failed ({err}); {where}") from err
    finally:
        partial.unlink(missing_ok=True)
    logger.info("downloaded %s to %s (MD5 %s verified)", url, path, known.md5)


def load_npy(section: DataSection) -> Dataset:
    """Load an image array and a label array (integers or one-hot), plus optional group ids."""
    assert section.path and section.labels_path  # checked by DataSection
    images = _load_array(section.path, "data.path")
    raw_labels = _load_array(section.labels_path, "data.labels_path")
    if images.ndim not in (3, 4):
        raise SweepError(f"data.path must hold images shaped (N, H, W) or (N, H, W, C), but got shape {images.shape}")
    labels = to_class_indices(raw_labels, field_name="data.labels_path", n_images=len(images))
    groups = None
    if section.groups_path:
        groups = _load_array(section.groups_path, "data.groups_path").reshape(-1)
        if len(groups) != len(images):
            raise SweepError(f"data.groups_path must have one group id per image ({len(images)}), but got {len(groups)}")
    names = section.class_names
    return Dataset(images=images, labels=labels, class_names=_class_names(names, labels, "data.class_names"), groups=groups, origin=section.path)


def load_folder(section: DataSection) -> Dataset:
    """Load one sub-folder per class of PNG or JPEG images of any size and mode."""
    assert section.path  # checked by DataSection
    root = Path(section.path)
    if not root.is_dir():
        raise SweepError(f"data.path folder not found: '{root}'")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if section.class_names:
        class_dirs = [root / name for name in section.class_names]
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    modes: list[str] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if class_dir.is_dir() else []
        if not files:
            raise SweepError(f"data.path class folder '{class_dir}' contains no .png, .jpg or .jpeg images")
        for file in files:
            images.append(read_image(file))
            modes.append(_image_mode(file))
            labels.append(index)
            names.append(str(file.relative_to(root)))
    if not class_dirs:
        raise SweepError(f"data.path '{root}' must contain one sub-folder per class, but has none")
    groups = _groups_from_names(names, section.group_by) if section.group_by else None
    return Dataset(
        images=_stack_if_uniform(images),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=tuple(d.name for d in class_dirs),
        groups=groups,
        origin=str(root),
        names=names,
        modes=modes,
    )


def read_image(path: Path) -> np.ndarray:
    """Read one image file as uint8: (H, W) for grayscale, (H, W, 3) for colour.

    Palette and alpha images are converted to RGB; the alpha channel is dropped.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("L", "I;16", "I", "F"):
                array = np.asarray(image.convert("F"), dtype=np.float32)
                if image.mode != "L":
                    array = _scale_to_uint8(array)
                return array.astype(np.uint8)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SweepError(f"data.path contains an unreadable image '{path}': {err}") from err


def _image_mode(path: Path) -> str:
    with Image.open(path) as image:
        return str(image.mode)


def to_class_indices(raw: np.ndarray, field_name: str, n_images: int) -> np.ndarray:
    """Convert labels given as integers, (N, 1) columns or one-hot rows to class indices."""
    labels = np.asarray(raw)
    if labels.ndim == 2 and labels.shape[1] > 1:
        if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()):
            raise SweepError(f"{field_name} must be integer class indices or one-hot rows, but got rows of shape {labels.shape[1:]} that are not one-hot")
        labels = labels.argmax(axis=1)
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1:
        raise SweepError(f"{field_name} must be shaped (N,), (N, 1) or one-hot (N, K), but got {np.asarray(raw).shape}")
    if len(labels) != n_images:
        raise SweepError(f"{field_name} must have one label per image, but got {len(labels)} labels for {n_images} images")
    whole_floats = np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))
    if not np.issubdtype(labels.dtype, np.integer) and not whole_floats:
        raise SweepError(f"{field_name} must be integer class indices, but got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min(initial=0) < 0:
        raise SweepError(f"{field_name} must be >= 0, but got {labels.min()}")
    return labels


def check_dataset(dataset: Dataset) -> None:
    """Raise SweepError for data that no sweep can use: one class or non-finite pixels."""
    present = np.unique(dataset.labels)
    if len(present) < 2:
        raise SweepError(f"data must contain at least 2 classes, but all {len(dataset)} labels are {present[0] if len(present) else 'missing'}")
    if dataset.labels.max() >= dataset.n_classes:
        raise SweepError(f"data.class_names lists {dataset.n_classes} classes, but the labels go up to {dataset.labels.max()}")
    if isinstance(dataset.images, np.ndarray):
        finite = np.isfinite(dataset.images.reshape(len(dataset), -1)).all(axis=1)
    else:
        finite = np.array([np.isfinite(image).all() for image in dataset.images])
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise SweepError(f"data from '{dataset.origin}' must have finite pixel values, but {len(bad)} images contain NaN or infinity (first: index {bad[0]})")


def stratified_subsample(dataset: Dataset, size: int, seed: int) -> Dataset:
    """Draw ``size`` images keeping the class ratio, with a generator seeded by ``seed``."""
    counts = np.bincount(dataset.labels)
    if size < np.count_nonzero(counts):
        raise SweepError(f"data.limit must be >= the number of classes ({np.count_nonzero(counts)}), but got {size}")
    indices = np.arange(len(dataset))
    selected, _ = train_test_split(indices, train_size=size, stratify=dataset.labels, random_state=seed)
    return dataset.subset(np.sort(selected))


def _load_array(path: str, field_name: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise SweepError(f"{field_name} file not found: '{file}'")
    try:
        return np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SweepError(f"{field_name} '{file}' is not a readable .npy array: {err}") from err


def _class_names(names: list[str] | None, labels: np.ndarray, field_name: str) -> tuple[str, ...]:
    n_classes = int(labels.max()) + 1
    if names is None:
        return tuple(str(i) for i in range(n_classes))
    if len(names) < n_classes:
        raise SweepError(f"{field_name} must name all {n_classes} classes, but got {len(names)}: {names}")
    return tuple(names)


def _groups_from_names(names: list[str], pattern: str) -> np.ndarray:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise SweepError(f"data.group_by must be a valid regular expression, but got {pattern!r}: {err}") from err
    groups = []
    for name in names:
        match = regex.search(Path(name).name)
        if match is None:
            raise SweepError(f"data.group_by {pattern!r} does not match the file name '{name}'")
        groups.append(match.group(1) if regex.groups else match.group(0))
    return np.asarray(groups)


def _stack_if_uniform(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    if images and all(image.shape == images[0].shape for image in images):
        return np.stack(images)
    return images


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros_like(array)
    return (array - low) / (high - low) * 255.0
