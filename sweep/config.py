"""Typed, strict configuration: YAML file plus dotted ``KEY=VALUE`` overrides.

Every field is validated once, at load time. Any problem raises
:class:`~sweep.errors.SweepError` with one line naming the field, the rule and
the value received.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sweep.errors import SweepError


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading exponents without a dot (``1e-4``) as floats, as YAML 1.2 does."""


_YamlLoader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text; ``1e-4`` is a float, not a string."""
    return yaml.load(text, Loader=_YamlLoader)


# Metric names recorded per epoch, as Keras 3 logs them, and the Keras 2 names users carry over.
MONITORED_METRICS = tuple(f"{split}{metric}" for split in ("val_", "") for metric in ("loss", "accuracy", "balanced_accuracy", "auc"))
KERAS2_METRIC_NAMES = {"acc": "accuracy", "val_acc": "val_accuracy"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StudySection(_Section):
    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Optuna study name; also the folder name under studies/.")
    dir: str | None = Field(None, description="Folder for the database, report, plots and best.yaml; default studies/<name>.")
    storage: str | None = Field(None, description="SQLAlchemy URL of the study database; default sqlite:///<dir>/study.db.")
    n_trials: int = Field(10, ge=1, description="Completed trials to reach; re-running continues up to this count.")
    max_trials: int | None = Field(None, ge=1, description="Cap on trials started in one run, pruned and failed ones included; default 3 x n_trials.")
    timeout: float | None = Field(None, gt=0, description="Stop starting new trials after this many seconds.")
    seed: int = Field(0, ge=0, description="Seed of the sampler, the fold assignment, the subsample and the model initialisation.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="Optuna pruner, fed the running mean after each fold.")
    prune_collapsed: bool = Field(False, description="Prune a trial as soon as its first fold is flagged collapsed.")
    objective: Literal["auc", "balanced_accuracy", "accuracy", "loss"] = Field(
        "auc", description="Validation metric averaged over folds; loss is minimised, the rest maximised."
    )

    @property
    def folder(self) -> Path:
        return Path(self.dir) if self.dir else Path("studies") / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.folder / 'study.db'}"

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "minimize" if self.objective == "loss" else "maximize"


class CvSection(_Section):
    folds: int = Field(3, ge=2, description="Number of stratified folds; at most the size of the smallest class.")


class DataSection(_Section):
    source: Literal["medmnist", "npy", "folder"] = Field("medmnist", description="Kind of input: a MedMNIST .npz, .npy arrays, or one sub-folder per class.")
    name: str = Field("pneumoniamnist", min_length=1, description="MedMNIST data set name; the file is <root>/<name>.npz.")
    root: str = Field("data", description="Folder holding MedMNIST files; the SWEEP_DATA_DIR environment variable overrides it.")
    path: str | None = Field(None, description="medmnist: the .npz file (overrides root/name); npy: the image array; folder: the class folders' parent.")
    labels_path: str | None = Field(None, description="npy: the label array (integers or one-hot).")
    groups_path: str | None = Field(None, description="npy: optional array of group (patient) ids, one per image.")
    group_by: str | None = Field(None, description="folder: optional regular expression whose first group extracts the patient id from a file name.")
    class_names: list[str] | None = Field(None, description="Names of the classes in label order; default from the data set or the folder names.")
    limit: int | None = Field(None, ge=2, description="Stratified subsample size drawn with study.seed, or null for all images.")
    download: bool = Field(True, description="medmnist: download the file from MedMNIST's record when it is missing.")
    test_path: str | None = Field(None, description="npy: held-out test images (.npy); folder: a folder of class sub-folders. Read only by sweep train.")
    test_labels_path: str | None = Field(None, description="npy: labels of the held-out test images.")
    on_conflict: Literal["error", "drop"] = Field(
        "error", description="What to do with identical images that carry different labels: stop with an error, or drop every copy."
    )

    @model_validator(mode="after")
    def _check_paths(self) -> Self:
        if self.source in ("npy", "folder") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}', but got null")
        if self.source == "npy" and not self.labels_path:
            raise ValueError("data.labels_path is required when data.source is 'npy', but got null")
        return self


class ModelSection(_Section):
    input_size: int = Field(32, ge=32, le=1024, description="Side in pixels that images are resized to; VGG16 needs at least 32.")
    weights: str = Field("imagenet", min_length=1, description="'imagenet', 'none' (random initialisation, for tests) or a weights file path.")
    pooling: Literal["avg", "max", "flatten"] = Field("avg", description="How the head reduces the base's feature map before the hidden layer.")


class TrainSection(_Section):
    warmup_epochs: int = Field(2, ge=0, description="Phase 1 epochs: the head alone, the whole base frozen.")
    epochs: int = Field(3, ge=1, description="Phase 2 epochs: the sampled top layers unfrozen.")
    batch_size: int = Field(32, ge=1, description="Images per gradient step.")
    warmup_learning_rate: float = Field(1e-3, gt=0, description="Learning rate of phase 1.")
    optimizer: Literal["adam", "sgd", "rmsprop"] = Field("adam", description="Keras optimizer of both phases (SGD with momentum 0.9).")
    fused_adam: bool = Field(True, description="Apply Adam's update with TensorFlow's fused kernel, one pass over memory; false runs Keras's own Adam update.")
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = Field(
        "auto", description="Keras dtype policy; auto picks mixed_bfloat16 where the processor has bfloat16 matrix units, else float32."
    )
    augment: bool = Field(False, description="Random flips, small rotations and zooms of training images; bypasses the feature cache.")
    final_epochs: int | None = Field(
        None, ge=1, description="sweep train: phase 2 epochs of the final model; default the median best epoch of the exported trial."
    )
    early_stopping: EarlyStoppingSection | None = Field(None, description="Stop phase 2 of a fold when the monitored metric stops improving.")


class EarlyStoppingSection(_Section):
    monitor: str = Field("val_loss", description="Metric watched in phase 2, named as Keras 3 logs it: val_loss, val_accuracy, val_auc, ...")
    patience: int = Field(2, ge=1, description="Phase 2 epochs without improvement before the fold stops.")

    @model_validator(mode="after")
    def _check_monitor(self) -> Self:
        if self.monitor not in MONITORED_METRICS:
            renamed = KERAS2_METRIC_NAMES.get(self.monitor)
            hint = f"; Keras 3 logs it as '{renamed}'" if renamed else f"; valid names: {', '.join(MONITORED_METRICS)}"
            raise ValueError(f"train.early_stopping.monitor must be a metric Keras logs, but got '{self.monitor}'{hint}")
        return self


class CacheSection(_Section):
    enabled: bool = Field(True, description="Train on stored outputs of the frozen VGG16 layers instead of recomputing them every step.")
    max_gb: float = Field(8.0, gt=0, description="Disk the feature cache of one study may use, in GiB; a larger need is rejected at start-up.")


class RuntimeSection(_Section):
    workers: Literal["process", "inline"] = Field("process", description="Run trials in recycled worker processes, or inline in the command's own process.")
    parallel: int | Literal["auto"] = Field(
        1,
        description=(
            "Worker processes that run trials at the same time, each with an equal share of the CPU cores; "
            "auto: one per core up to 4 on a CPU, one with a GPU. Ignored with workers: inline."
        ),
    )

    @model_validator(mode="after")
    def _check_parallel(self) -> Self:
        if isinstance(self.parallel, int) and self.parallel < 1:
            raise ValueError(f"runtime.parallel must be auto or an integer >= 1, but got {self.parallel}")
        return self

    max_trials_per_worker: int = Field(25, ge=1, description="A worker process exits after this many trials and a fresh one continues.")
    memory_growth: float = Field(
        0.05,
        gt=0,
        description=(
            "A worker exits once its anonymous resident memory (not counting mapped feature files) exceeds that after its first trial by this fraction."
        ),
    )


class FloatRange(_Section):
    low: float = Field(description="Lower bound, inclusive.")
    high: float = Field(description="Upper bound, inclusive.")
    log: bool = Field(False, description="Sample on a log scale.")

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        if self.low > self.high:
            raise ValueError(f"low must be <= high, but got low={self.low} and high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low must be > 0 on a log scale, but got {self.low}")
        return self


class IntRange(FloatRange):
    low: int = Field(description="Lower bound, inclusive.")
    high: int = Field(description="Upper bound, inclusive.")


class SearchSection(_Section):
    """Each hyperparameter is a range to sample or a single fixed value."""

    learning_rate: FloatRange | float = Field(FloatRange(low=1e-5, high=1e-3, log=True), description="Phase 2 learning rate.")
    decay: FloatRange | float = Field(FloatRange(low=1e-6, high=1e-2, log=True), description="Inverse-time decay rate per step: lr / (1 + decay * step).")
    head_units: IntRange | int = Field(IntRange(low=32, high=256, log=True), description="Units of the hidden dense layer of the head.")
    dropout: FloatRange | float = Field(FloatRange(low=0.0, high=0.6), description="Dropout rate after the hidden dense layer.")
    unfreeze_layers: IntRange | int = Field(
        IntRange(low=0, high=6), description="Convolution layers unfrozen from the top in phase 2 (0 = head only, 13 = all)."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        _check_bound("search.learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        _check_bound("search.decay", self.decay, low=0.0)
        _check_bound("search.head_units", self.head_units, low=1)
        _check_bound("search.dropout", self.dropout, low=0.0, high=0.95)
        _check_bound("search.unfreeze_layers", self.unfreeze_layers, low=0, high=13)
        return self


class OriginSection(_Section):
    """Provenance of an exported configuration; ``sweep run`` ignores it."""

    study: str = Field(description="Name of the study the values were taken from.")
    trial: int = Field(description="Optuna trial number.")
    objective: str = Field(description="Metric that ranked the trials.")
    cv_mean: float = Field(description="Mean of the objective over folds.")
    cv_std: float = Field(description="Standard deviation of the objective over folds.")
    best_epochs: list[int] = Field(default_factory=list, description="Phase 2 epoch with the best validation objective, per fold (1-based).")
    threshold: float | None = Field(
        None, description="Binary tasks: the probability threshold maximising sensitivity + specificity on the cross-validation predictions."
    )
    search: SearchSection | None = Field(None, description="The search ranges of the source study; sweep train rejects values outside them.")


class Config(_Section):
    study: StudySection = Field(default_factory=StudySection)
    cv: CvSection = Field(default_factory=CvSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    search: SearchSection = Field(default_factory=SearchSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    origin: OriginSection | None = None


def _check_bound(
    field: str,
    value: FloatRange | float,
    low: float,
    high: float | None = None,
    low_inclusive: bool = True,
) -> None:
    values = (value.low, value.high) if isinstance(value, FloatRange) else (value,)
    for v in values:
        too_low = v < low if low_inclusive else v <= low
        if too_low or (high is not None and v > high):
            sign = ">=" if low_inclusive else ">"
            rule = f"{sign} {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"{field} must be {rule}, but got {v}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file and apply dotted ``KEY=VALUE`` overrides.

    Args:
        path: The YAML file.
        overrides: Strings such as ``"cv.folds=3"``; values are parsed as YAML scalars.

    Returns:
        The validated, frozen configuration.

    Raises:
        SweepError: The file is missing or not valid YAML, or any field is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"config file not found: '{path}'")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SweepError(f"config file '{path}' is not valid YAML{where}: {problem}") from err
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SweepError(f"config file '{path}' must contain a mapping of sections, but got {type(raw).__name__}")
    data = apply_overrides(raw, overrides)
    return config_from_dict(data)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=value`` override set."""
    data = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SweepError(f"override must look like KEY=VALUE (for example cv.folds=3), but got '{item}'")
        try:
            value = load_yaml(text) if text else None
        except yaml.YAMLError as err:
            raise SweepError(f"override {key} has a value that is not a valid YAML scalar: '{text}'") from err
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise SweepError(f"override {key}: '{prefix}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain mapping into a :class:`Config`, raising a one-line SweepError."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise SweepError(_describe(err, data)) from err


def config_to_dict(config: Config) -> dict[str, Any]:
    """Return the configuration as plain YAML-ready data, without unset optional blocks."""
    return config.model_dump(mode="json", exclude_none=False, exclude={"origin"} if config.origin is None else set())


_RULES = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "missing": "set",
}


def _describe(err: ValidationError, data: dict[str, Any]) -> str:
    errors = err.errors()
    # A union (range or fixed value) reports one error per branch; the
    # mapping branch is the informative one when the user wrote a mapping.
    first = _pick_error(errors)
    loc = [str(part) for part in first["loc"] if not _is_union_tag(part)]
    field = ".".join(loc)
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        return _unknown_key_message(loc)
    if loc == ["runtime", "parallel"]:
        return f"runtime.parallel must be auto or an integer >= 1, but got {value!r}"
    if loc and loc[0] == "search" and len(loc) == 2 and not isinstance(value, dict):
        number = "an integer" if loc[1] in ("head_units", "unfreeze_layers") else "a number"
        return f"{field} must be {number} or a mapping with low, high and optional log, but got {value!r}"
    if kind == "value_error":
        message = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        message = message.removeprefix("Value error, ")
        if message.startswith("low ") and field:
            return f"{field}: {message}"
        return message
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return f"{field} must be one of {expected}, but got {value!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        ctx = first.get("ctx", {})
        sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        limit = next(iter(ctx.values()), "")
        return f"{field} must be {sign} {limit}, but got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"{field} must contain only letters, digits, '.', '_' and '-', but got {value!r}"
    if kind == "string_too_short":
        return f"{field} must not be empty, but got {value!r}"
    rule = _RULES.get(kind, first["msg"].lower())
    if kind == "missing":
        return f"{field} must be set"
    return f"{field} must be {rule}, but got {value!r}"


def _pick_error(errors: list[Any]) -> Any:
    for error in errors:
        if error["type"] in ("extra_forbidden", "value_error"):
            return error
    for error in errors:
        if not any(_is_union_tag(part) for part in error["loc"]):
            return error
    for error in errors:
        if any(str(part) in ("FloatRange", "IntRange") for part in error["loc"]) and isinstance(error.get("input"), dict):
            return error
    return errors[0]


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in ("FloatRange", "IntRange", "float", "int") or part.startswith(("function-", "literal[")))


def _unknown_key_message(loc: list[str]) -> str:
    *parents, name = loc
    model: type[BaseModel] = Config
    for part in parents:
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            break
        model = candidates[0]
    valid = list(model.model_fields)
    full = ".".join(loc)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    prefix = ".".join(parents)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"unknown config key '{full}'; did you mean '{suggestion}'?"
    where = f"in section '{prefix}'" if prefix else "at the top level"
    return f"unknown config key '{full}'; valid keys {where}: {', '.join(valid)}"
