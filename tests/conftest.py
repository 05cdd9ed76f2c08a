"""Shared fixtures: the bundled PneumoniaMNIST file, tiny configs and one real end-to-end study."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"


def data_dir() -> Path:
    """Return the folder with pneumoniamnist.npz: SWEEP_DATA_DIR, else ../shared/data."""
    return Path(os.environ.get("SWEEP_DATA_DIR") or DEFAULT_DATA_DIR)


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    path = data_dir() / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.fail(f"PneumoniaMNIST not found at {path}; set SWEEP_DATA_DIR to the folder that holds pneumoniamnist.npz")
    return path


def tiny_config(folder: Path, npz: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """Return a config dict for a fast study on 40 real images at 32 px with random weights."""
    config: dict[str, Any] = {
        "study": {"name": "tiny", "dir": str(folder), "n_trials": 2, "seed": 0, "pruner": "none"},
        "cv": {"folds": 2},
        "data": {"source": "medmnist", "path": str(npz), "limit": 40},
        "model": {"input_size": 32, "weights": "none"},
        "train": {"warmup_epochs": 1, "epochs": 1, "batch_size": 16},
        "search": {
            "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
            "decay": {"low": 1e-6, "high": 1e-3, "log": True},
            "head_units": {"low": 8, "high": 32},
            "dropout": {"low": 0.0, "high": 0.5},
            "unfreeze_layers": {"low": 0, "high": 3},
        },
    }
    for name, values in sections.items():
        config[name].update(values)
    return config


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_sweep(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sweep`` in a child process, as a user would from the shell."""
    env = dict(os.environ)
    env.setdefault("SWEEP_DATA_DIR", str(data_dir()))
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run(
        [sys.executable, "-m", "sweep", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path) -> Path:
    """Run one real 2-trial, 2-fold study through the command line; return its config file."""
    folder = tmp_path_factory.mktemp("tiny-study")
    config_path = write_yaml(folder / "tiny.yaml", tiny_config(folder / "study", pneumonia_npz))
    result = run_sweep("run", str(config_path))
    assert result.returncode == 0, result.stderr[-3000:]
    return config_path


def make_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return n uint8 grayscale images whose brightness depends on a balanced binary label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, size=(n, size, size)).astype(np.uint8)
    images[labels == 1] += 100
    return images, labels
