"""Tests for sweep.config: loading, overrides and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.config import FloatRange, IntRange, apply_overrides, config_from_dict, load_config
from sweep.errors import SweepError

REPO = Path(__file__).resolve().parents[1]


def test_default_config_loads() -> None:
    config = load_config(REPO / "conf" / "default.yaml")
    assert config.study.name == "pneumonia-default"
    assert config.model.weights == "imagenet"
    assert config.study.storage_url == "sqlite:///studies/pneumonia-default/study.db"
    assert isinstance(config.search.learning_rate, FloatRange)
    assert config.search.learning_rate.log is True


def test_gpu_config_loads() -> None:
    config = load_config(REPO / "conf" / "pneumonia-gpu.yaml")
    assert config.model.input_size == 224
    assert config.data.limit is None


def test_overrides_parse_yaml_scalars() -> None:
    config = load_config(
        REPO / "conf" / "default.yaml",
        ["study.n_trials=5", "cv.folds=4", "data.limit=null", "model.weights=none", "study.name=other", "train.warmup_learning_rate=1e-2"],
    )
    assert config.study.n_trials == 5
    assert config.cv.folds == 4
    assert config.data.limit is None
    assert config.model.weights == "none"
    assert config.study.folder == Path("studies/other")
    assert config.train.warmup_learning_rate == pytest.approx(0.01)


def test_override_creates_search_range() -> None:
    data = apply_overrides({}, ["search.head_units={low: 4, high: 8}", "search.dropout=0.2"])
    config = config_from_dict(data)
    assert config.search.head_units == IntRange(low=4, high=8)
    assert config.search.dropout == pytest.approx(0.2)


def test_study_dir_override() -> None:
    config = config_from_dict({"study": {"name": "a", "dir": "/tmp/x"}})
    assert config.study.storage_url == "sqlite:////tmp/x/study.db"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cv": {"fold": 3}}, r"^unknown config key 'cv.fold'; did you mean 'cv.folds'\?$"),
        ({"studdy": {}}, r"^unknown config key 'studdy'; did you mean 'study'\?$"),
        ({"search": {"learning_rat": 0.1}}, r"did you mean 'search.learning_rate'"),
        ({"cv": {"zzz": 1}}, r"valid keys in section 'cv': folds"),
        ({"cv": {"folds": "three"}}, r"^cv.folds must be an integer, but got 'three'$"),
        ({"train": {"batch_size": True}}, r"^train.batch_size must be an integer, but got True$"),
        ({"cv": {"folds": 1}}, r"^cv.folds must be >= 2, but got 1$"),
        ({"study": {"pruner": "asha"}}, r"^study.pruner must be one of 'median', 'hyperband' or 'none', but got 'asha'$"),
        ({"study": {"name": "a/b"}}, r"study.name must contain only letters"),
        ({"model": {"input_size": 16}}, r"^model.input_size must be >= 32, but got 16$"),
        ({"search": {"learning_rate": {"low": 1e-3, "high": 1e-5}}}, r"^search.learning_rate: low must be <= high, but got low=0.001 and high=1e-05$"),
        ({"search": {"learning_rate": -0.1}}, r"^search.learning_rate must be > 0.0, but got -0.1$"),
        ({"search": {"decay": {"low": 0.0, "high": 0.1, "log": True}}}, r"search.decay: low must be > 0 on a log scale, but got 0.0"),
        ({"search": {"unfreeze_layers": {"low": 0, "high": 14}}}, r"search.unfreeze_layers must be >= 0 and <= 13, but got 14"),
        ({"search": {"head_units": "wide"}}, r"search.head_units must be an integer or a mapping with low, high and optional log, but got 'wide'"),
        ({"data": {"source": "npy"}}, r"data.path is required when data.source is 'npy'"),
        ({"data": {"limit": 1}}, r"^data.limit must be >= 2, but got 1$"),
    ],
)
def test_invalid_config_message(data: dict[str, object], message: str) -> None:
    with pytest.raises(SweepError, match=message):
        config_from_dict(data)


def test_missing_file() -> None:
    with pytest.raises(SweepError, match=r"^config file not found: '/nowhere.yaml'$"):
        load_config("/nowhere.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("study:\n  name: x\n  n_trials: [1,\n")
    with pytest.raises(SweepError, match=r"is not valid YAML at line 4"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SweepError, match=r"must contain a mapping of sections, but got list"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cv.folds", r"override must look like KEY=VALUE"),
        ("cv.folds.x=3", r"override cv.folds.x: 'cv.folds' is a value, not a section"),
        ("cv.foldz=3", r"did you mean 'cv.folds'"),
    ],
)
def test_bad_override(override: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        config_from_dict(apply_overrides({"cv": {"folds": 3}}, [override]))


def test_config_is_frozen() -> None:
    config = config_from_dict({})
    with pytest.raises(Exception, match="frozen"):
        config.cv.folds = 5  # type: ignore[misc]
