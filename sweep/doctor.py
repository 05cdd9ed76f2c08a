"""Data check before every sweep: label order, class balance, duplicates, groups, intensity and channels.

``sweep doctor`` prints the findings; ``sweep run`` runs the same check, stops on
errors, and stores the summary with the study.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sweep.config import Config
from sweep.data import Dataset, check_dataset, limit_dataset, load_source
from sweep.errors import SweepError

# A class ratio above this (majority : minority) is reported as a warning.
IMBALANCE_WARNING = 3.0
# Keras's validation_split takes this fraction from the end of the arrays, before any shuffling.
KERAS_VALIDATION_SPLIT = 0.2
# File names that look like patient, subject or case identifiers followed by a slice number.
PATIENT_NAME = re.compile(r"^((?:p|pt|pat|patient|sub|subj|subject|case|id)[-_]?\d+)[-_ ]", re.IGNORECASE)
EXAMPLES = 5

Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One result of the data check."""

    level: Level
    check: str  # label_order, class_balance, duplicates, groups, intensity, channels
    message: str


@dataclass
class DoctorReport:
    """All findings, a machine-readable summary, and the content cluster of every image."""

    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    clusters: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: Level, check: str, message: str) -> None:
        self.findings.append(Finding(level, check, message))

    def to_dict(self) -> dict[str, Any]:
        """Return the summary and findings as JSON-ready data."""
        return {"summary": self.summary, "findings": [asdict(f) for f in self.findings]}


def examine(dataset: Dataset, on_conflict: str = "error") -> DoctorReport:
    """Run every check on ``dataset`` and return the findings.

    Args:
        dataset: The labelled images, before any subsampling.
        on_conflict: ``error`` to report identical images with different labels as an
            error, ``drop`` to report them as dropped.
    """
    report = DoctorReport()
    report.summary["images"] = len(dataset)
    report.summary["origin"] = dataset.origin
    _check_balance(dataset, report)
    _check_order(dataset, report)
    _check_duplicates(dataset, report, on_conflict)
    _check_groups(dataset, report)
    _check_intensity(dataset, report)
    _check_channels(dataset, report)
    return report


def content_clusters(dataset: Dataset) -> np.ndarray:
    """Return, for every image, the index of the first image with identical decoded content."""
    first: dict[bytes, int] = {}
    clusters = np.empty(len(dataset), dtype=np.int64)
    for index, image in enumerate(dataset.images):
        digest = hashlib.sha1(str((image.shape, image.dtype.str)).encode() + np.ascontiguousarray(image).tobytes()).digest()
        clusters[index] = first.setdefault(digest, index)
    return clusters


def conflicting_images(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Return the indices of images whose identical copies carry another label."""
    labels_of: dict[int, set[int]] = {}
    for cluster, label in zip(clusters.tolist(), labels.tolist(), strict=True):
        labels_of.setdefault(cluster, set()).add(label)
    bad = {c for c, found in labels_of.items() if len(found) > 1}
    return np.flatnonzero(np.isin(clusters, list(bad)))


def format_report(report: DoctorReport) -> str:
    """Return the findings as lines for the terminal, errors first."""
    order = {"error": 0, "warning": 1, "info": 2}
    lines = [f"{f.level}: {f.check.replace('_', ' ')}: {f.message}" for f in sorted(report.findings, key=lambda f: order[f.level])]
    lines.append(f"{len(report.errors)} errors, {len(report.warnings)} warnings")
    return "\n".join(lines)


def _check_balance(dataset: Dataset, report: DoctorReport) -> None:
    counts = np.bincount(dataset.labels, minlength=dataset.n_classes)
    present = counts[counts > 0]
    majority = int(np.argmax(counts))
    ratio = float(present.max() / present.min())
    majority_rate = float(counts[majority] / counts.sum())
    report.summary["class_counts"] = {name: int(n) for name, n in zip(dataset.class_names, counts, strict=True)}
    report.summary["imbalance_ratio"] = round(ratio, 2)
    report.summary["majority_rate"] = round(majority_rate, 4)
    listed = ", ".join(f"{name} {int(n)}" for name, n in zip(dataset.class_names, counts, strict=True))
    consequence = f"a model that predicts only '{dataset.class_names[majority]}' scores accuracy {majority_rate:.3f}"
    if len(present) < 2:
        report.add("error", "class_balance", f"{listed}: a single class, nothing to classify")
    elif ratio > IMBALANCE_WARNING:
        report.add("warning", "class_balance", f"{listed} (1:{ratio:.1f}, above {IMBALANCE_WARNING:.0f}:1); {consequence}; compare balanced accuracy and AUC")
    else:
        report.add("info", "class_balance", f"{listed} (1:{ratio:.1f}); {consequence}")


def _check_order(dataset: Dataset, report: DoctorReport) -> None:
    labels = dataset.labels
    changes = np.flatnonzero(np.diff(labels) != 0)
    starts = np.concatenate([[0], changes + 1])
    lengths = np.diff(np.concatenate([starts, [len(labels)]]))
    longest = int(np.argmax(lengths))
    # Keras validates on x[int(len(x) * (1 - validation_split)):].
    tail = labels[min(int(len(labels) * (1 - KERAS_VALIDATION_SPLIT)), len(labels) - 1) :]
    tail_classes = np.unique(tail)
    is_sorted = bool(np.all(np.diff(labels) >= 0) or np.all(np.diff(labels) <= 0))
    report.summary["labels_sorted"] = is_sorted
    report.summary["longest_label_run"] = int(lengths[longest])
    run = f"longest run: {int(lengths[longest])} images of class '{dataset.class_names[labels[starts[longest]]]}' from index {int(starts[longest])}"
    if len(tail_classes) == 1:
        report.add(
            "warning",
            "label_order",
            f"labels are {'sorted' if is_sorted else 'in long runs'} ({run}): a Keras validation_split=0.2 on this array would validate "
            f"on class '{dataset.class_names[tail_classes[0]]}' only; shuffle before splitting (sweep's own folds are stratified)",
        )
    elif is_sorted or lengths[longest] >= max(20, len(labels) // 10):
        report.add("warning", "label_order", f"labels are {'sorted' if is_sorted else 'in long runs'} ({run}); shuffle before any split by position")
    else:
        report.add("info", "label_order", f"labels are mixed ({run})")


def _check_duplicates(dataset: Dataset, report: DoctorReport, on_conflict: str) -> None:
    clusters = content_clusters(dataset)
    report.clusters = clusters
    sizes = Counter(clusters.tolist())
    repeated = {c: n for c, n in sizes.items() if n > 1}
    copies = sum(repeated.values())
    conflicts = conflicting_images(dataset.labels, clusters)
    report.summary["duplicate_images"] = copies
    report.summary["duplicate_groups"] = len(repeated)
    report.summary["conflicting_images"] = len(conflicts)
    if repeated:
        examples = [f"{c} and {int(np.flatnonzero(clusters == c)[1])}" for c in list(repeated)[:EXAMPLES]]
        report.add(
            "warning",
            "duplicates",
            f"{copies} images are identical to another ({len(repeated)} groups, e.g. indices {'; '.join(examples)}); "
            "each group is kept in one fold so no copy is on both sides of a split",
        )
    else:
        report.add("info", "duplicates", "no identical images")
    if len(conflicts):
        names = ", ".join(str(i) for i in conflicts[:EXAMPLES])
        if on_conflict == "drop":
            report.add("warning", "duplicates", f"{len(conflicts)} identical images carry different labels (e.g. indices {names}); all copies are dropped")
        else:
            report.add(
                "error",
                "duplicates",
                f"{len(conflicts)} identical images carry different labels (e.g. indices {names}); fix the labels or set data.on_conflict=drop",
            )


def _check_groups(dataset: Dataset, report: DoctorReport) -> None:
    if dataset.groups is not None:
        n_groups = len(np.unique(dataset.groups))
        report.summary["groups"] = n_groups
        report.add("info", "groups", f"{n_groups} groups (patients); every fold keeps each group whole")
        return
    report.summary["groups"] = None
    matches = [PATIENT_NAME.match(Path(name).name) for name in dataset.names]
    ids = {m.group(1) for m in matches if m}
    if dataset.names and len(ids) >= 2 and sum(m is not None for m in matches) >= len(dataset.names) // 2 and len(ids) < len(dataset.names):
        example = next(m.group(1) for m in matches if m)
        report.add(
            "warning",
            "groups",
            f"file names look like patient ids ({len(ids)} ids such as '{example}' across {len(dataset.names)} images) but no group is set; "
            r"set data.group_by (for example '^([A-Za-z]+\d+)_') so one patient's images never sit on both sides of a split",
        )
    else:
        report.add("info", "groups", "no group column; folds are stratified by label only")


def _check_intensity(dataset: Dataset, report: DoctorReport) -> None:
    images = dataset.images
    dtypes = sorted({str(image.dtype) for image in images})
    finite = [bool(np.isfinite(image).all()) for image in images] if any(np.issubdtype(np.dtype(d), np.floating) for d in dtypes) else []
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad:
        report.add("error", "intensity", f"{len(bad)} images contain NaN or infinite values (e.g. indices {', '.join(map(str, bad[:EXAMPLES]))})")
        values = [image[np.isfinite(image)] for image in images]
        low = min(float(v.min()) for v in values if v.size)
        high = max(float(v.max()) for v in values if v.size)
    else:
        low = min(float(image.min()) for image in images)
        high = max(float(image.max()) for image in images)
    report.summary["dtype"] = ",".join(dtypes)
    report.summary["value_range"] = [low, high]
    span = f"{','.join(dtypes)} values from {low:g} to {high:g}"
    if all(d == "uint8" for d in dtypes):
        report.add("info", "intensity", f"{span}, the 0-255 range vgg16.preprocess_input expects")
    elif low >= 0.0 and high <= 1.0:
        report.add("info", "intensity", f"{span}; scaled by 255 to the 0-255 range vgg16.preprocess_input expects")
    elif low >= 0.0 and high <= 255.0:
        report.add("info", "intensity", f"{span}, within the 0-255 range vgg16.preprocess_input expects")
    else:
        report.add(
            "warning",
            "intensity",
            f"{span}: raw intensities outside the 0-255 range vgg16.preprocess_input expects; rescale them (for example per-image min-max to 0-255)",
        )


def _check_channels(dataset: Dataset, report: DoctorReport) -> None:
    images = dataset.images
    channels = Counter(1 if image.ndim == 2 else int(image.shape[-1]) for image in images)
    sizes = Counter(tuple(image.shape[:2]) for image in images)
    report.summary["channels"] = {str(k): v for k, v in channels.items()}
    report.summary["sizes"] = len(sizes)
    if set(channels) == {1}:
        report.add("info", "channels", "grayscale images, copied to three channels for VGG16")
    else:
        report.add("info", "channels", ", ".join(f"{n} images with {k} channel{'s' if k > 1 else ''}" for k, n in sorted(channels.items())))
    if dataset.modes and len(set(dataset.modes)) > 1:
        listed = ", ".join(f"{mode} {n}" for mode, n in Counter(dataset.modes).most_common())
        report.add("warning", "channels", f"image files of mixed modes ({listed}); all are converted to 8-bit grayscale or RGB")
    if len(sizes) > 1:
        smallest, largest = min(sizes), max(sizes)
        report.add("info", "channels", f"{len(sizes)} image sizes from {smallest[0]}x{smallest[1]} to {largest[0]}x{largest[1]}; all are resized")


def prepare_dataset(config: Config) -> tuple[Dataset, DoctorReport]:
    """Load the configured data, check it, drop conflicting duplicates if asked, and subsample.

    The check runs on the whole data set, before ``data.limit``.

    Raises:
        SweepError: The data is unusable, or the check found an error.
    """
    dataset = load_source(config.data)
    check_dataset(dataset)
    report = examine(dataset, config.data.on_conflict)
    if report.errors:
        raise SweepError(f"data check failed: {report.errors[0].message}; `sweep doctor` lists every finding")
    dataset = replace(dataset, clusters=report.clusters)
    conflicts = conflicting_images(dataset.labels, report.clusters)
    if len(conflicts):
        dataset = dataset.subset(np.setdiff1d(np.arange(len(dataset)), conflicts))
    return limit_dataset(dataset, config), report
