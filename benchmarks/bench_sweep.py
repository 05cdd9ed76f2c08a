"""Benchmark: the same study run the naive way and sweep's way, side by side.

The naive way is what a hand-written Keras + Optuna loop does: float32, the
whole network runs every step (no feature cache), no pruning, one process. The
sweep way uses the defaults: the frozen-prefix feature cache, the precision
``auto`` picks, the median pruner and recycled worker processes. Both run on
real PneumoniaMNIST images with real ImageNet weights, the same seed, sampler,
search space and folds. Each runs in its own child process so that its peak
memory is measured alone.

Usage:
    python benchmarks/bench_sweep.py [--trials 8] [--folds 3] [--size 64] [--limit 450]
    python benchmarks/bench_sweep.py --trials 20 --modes sweep   # memory per trial
    python benchmarks/bench_sweep.py --modes sweep,sweep-float32  # what bfloat16 changes

Both ways run the same number of trials, pruned ones included, as Optuna
counts them. The sampler draws trial n with seed ``study.seed + n`` and TPE
samples its first 10 trials at random, so up to 10 trials both ways try the
same configurations. The naive way trains every one to the end; sweep's way
prunes some after a fold. Trials per hour therefore count configurations
tried, completed or rejected, and the best CV AUC shows whether pruning lost
the best one. The table also gives completed trials per hour, and the line
before the last their ratio.

The last line is ``speedup: N.Nx``: trials per hour of sweep's way over the naive way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def study_config(args: argparse.Namespace, folder: Path, mode: str) -> dict[str, Any]:
    """Return the config of one mode; only how the work is done differs between the modes."""
    data_dir = os.environ.get("SWEEP_DATA_DIR") or str(REPO.parent / "shared" / "data")
    config: dict[str, Any] = {
        "study": {
            "name": f"bench-{mode}",
            "dir": str(folder / mode),
            "n_trials": args.trials,
            # Pruned trials count towards the limit, so both ways run the same trials.
            "max_trials": args.trials,
            "seed": 0,
            "sampler": "tpe",
        },
        "cv": {"folds": args.folds},
        "data": {"source": "medmnist", "path": str(Path(data_dir) / "pneumoniamnist.npz"), "limit": args.limit},
        "model": {"input_size": args.size, "weights": "imagenet"},
        "train": {"warmup_epochs": args.warmup, "epochs": args.epochs, "batch_size": 32},
        "search": {
            "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
            "decay": {"low": 1e-6, "high": 1e-2, "log": True},
            "head_units": {"low": 32, "high": 256, "log": True},
            "dropout": {"low": 0.0, "high": 0.6},
            "unfreeze_layers": {"low": 0, "high": args.max_unfreeze},
        },
    }
    if mode == "sweep-float32":
        config["study"]["pruner"] = "median"
        config["train"]["precision"] = "float32"
    elif mode == "naive":
        config["study"]["pruner"] = "none"
        config["train"]["precision"] = "float32"
        # A hand-written loop updates the weights with Keras's own Adam.
        config["train"]["fused_adam"] = False
        config["cache"] = {"enabled": False}
        config["runtime"] = {"workers": "inline"}
    else:
        config["study"]["pruner"] = "median"
        config["train"]["precision"] = args.precision
    return config


def run_mode(config_path: Path) -> dict[str, Any]:
    """Run one study in this process (called in a child) and return its measurements."""
    sys.path.insert(0, str(REPO))
    from sweep.cli import configure_logging
    from sweep.config import load_config
    from sweep.study import run_study
    from sweep.tf_quiet import import_tensorflow_quietly

    configure_logging(verbose=False)
    import_tensorflow_quietly()
    config = load_config(config_path)
    started = time.perf_counter()
    study = run_study(config)
    wall = time.perf_counter() - started
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "wall_s": wall,
        "completed": len(complete),
        "started": len(trials),
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        "best_auc": study.best_value if complete else float("nan"),
        "peak_rss_mb": max(own, children),
        "rss_by_trial": [(t.number, t.user_attrs.get("rss_mb")) for t in finished],
        "anon_by_trial": [(t.number, t.user_attrs.get("anon_mb")) for t in finished],
        "workers": len({t.user_attrs.get("worker") for t in finished}),
        "precision": complete[0].user_attrs.get("precision", "") if complete else "",
    }


def matmul_rates() -> dict[str, float]:
    """Return the measured float32 and bfloat16 matrix-multiply rates of this machine in GFLOP/s."""
    import tensorflow as tf

    rates = {}
    n = 2048
    for dtype in ("float32", "bfloat16"):
        a = tf.random.normal((n, n), dtype=tf.float32)
        a = tf.cast(a, dtype)
        b = tf.cast(tf.random.normal((n, n)), dtype)
        matmul = tf.function(lambda x, y: tf.matmul(x, y))
        matmul(a, b).numpy()
        repeats = 10
        started = time.perf_counter()
        for _ in range(repeats):
            out = matmul(a, b)
        out.numpy()
        rates[dtype] = 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9
    return rates


def cached_step_rate(size: int, precision: str, unfreeze: int) -> tuple[float, float, str]:
    """Time the traced training step that sweep runs on stored features above a cut; return (GFLOP/s, images/s, cut).

    FLOPs count the convolutions and dense layers above the cut: 2 x multiply-adds
    forward, and three times that for a training step (forward, input gradients and
    weight gradients), which is the usual estimate.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(REPO))
    from sweep.config import TrainSection
    from sweep.features import feature_shape
    from sweep.model import HyperParameters, cut_layer, trained_convolutions
    from sweep.network import Network

    params = HyperParameters(learning_rate=1e-4, decay=0.0, head_units=128, dropout=0.2, unfreeze_layers=unfreeze)
    cut = cut_layer(2, unfreeze)
    assert cut is not None
    network = Network(2, size, None, TrainSection(), "avg", precision, head_width=128, max_unfreeze=unfreeze)
    network.restart(network.head_start(params, seed=0))
    network.start_phase(params.learning_rate, params.decay)
    train_step, _ = network.step_functions(cut, trained_convolutions(2, unfreeze), keep=True)
    batch = 32
    x = tf.constant(np.random.default_rng(0).random((batch, *feature_shape(cut, size)), dtype=np.float32))
    y = tf.constant(np.arange(batch, dtype=np.int64) % 2)
    for _ in range(3):
        train_step(x, y)[0].numpy()
    steps = 30
    started = time.perf_counter()
    for _ in range(steps):
        loss = train_step(x, y)[0]
    loss.numpy()
    seconds = time.perf_counter() - started
    flops_per_image = 0
    for layer in network.model(cut).layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            c_in = layer.input.shape[-1]
            flops_per_image += 2 * h * w * 9 * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            flops_per_image += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    images = batch * steps
    return 3 * flops_per_image * images / seconds / 1e9, images / seconds, cut


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per study, pruned ones included (default 8)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="input size in pixels (default 64)")
    parser.add_argument("--limit", type=int, default=450, help="images drawn from PneumoniaMNIST (default 450: 300 training images per fold)")
    parser.add_argument("--warmup", type=int, default=2, help="phase 1 epochs (default 2)")
    parser.add_argument("--epochs", type=int, default=3, help="phase 2 epochs (default 3)")
    parser.add_argument("--max-unfreeze", type=int, default=6, help="upper end of search.unfreeze_layers (default 6)")
    parser.add_argument("--precision", default="auto", help="train.precision of sweep's way (default auto)")
    parser.add_argument(
        "--modes",
        default="naive,sweep",
        help="comma-separated ways to run: naive, sweep, and sweep-float32 (sweep's way in float32, to see what bfloat16 changes)",
    )
    parser.add_argument("--run-mode", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_mode:
        print(json.dumps(run_mode(args.run_mode)))
        return 0

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        folder = Path(tmp)
        for mode in args.modes.split(","):
            path = folder / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(study_config(args, folder, mode), sort_keys=False))
            print(f"running the {mode} study ...", file=sys.stderr, flush=True)
            child = subprocess.run([sys.executable, __file__, "--run-mode", str(path)], capture_output=True, text=True, check=False)
            if child.returncode != 0:
                print(child.stderr[-4000:], file=sys.stderr)
                return 1
            results[mode] = json.loads(child.stdout.strip().splitlines()[-1])

    _print_table(args, results)
    ours = results.get("sweep") or next(iter(results.values()))
    _print_hardware(args, ours["precision"])
    _print_memory(ours)
    if "sweep-float32" in results and "sweep" in results:
        change = results["sweep"]["best_auc"] - results["sweep-float32"]["best_auc"]
        print(f"best CV AUC, {results['sweep']['precision']} minus float32: {change:+.4f} (auto keeps bfloat16 only within 0.01)")
    if "naive" in results and "sweep" in results:
        naive, ours = results["naive"], results["sweep"]
        completed_ratio = (ours["completed"] / ours["wall_s"]) / (naive["completed"] / naive["wall_s"])
        print(f"best CV AUC difference (sweep - naive): {ours['best_auc'] - naive['best_auc']:+.4f}")
        print(f"completed trials per hour, sweep over naive: {completed_ratio:.1f}x")
        print(f"speedup: {(ours['started'] / ours['wall_s']) / (naive['started'] / naive['wall_s']):.1f}x")
    return 0


def _print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    print(f"\nstudy: PneumoniaMNIST, {args.limit} images at {args.size} px, {args.trials} trials, {args.folds} folds, "
          f"{args.warmup}+{args.epochs} epochs, ImageNet weights, TPE seed 0")  # fmt: skip
    header = (
        f"{'way':<14} {'wall (s)':>9} {'completed':>10} {'started':>8} {'pruned':>7} {'trials/h':>9} {'completed/h':>12} "
        f"{'best CV AUC':>12} {'peak RSS (MiB)':>15} {'precision':>15}"
    )
    print(header)
    print("-" * len(header))
    for mode, r in results.items():
        per_hour = r["started"] / r["wall_s"] * 3600
        completed_per_hour = r["completed"] / r["wall_s"] * 3600
        print(
            f"{mode:<14} {r['wall_s']:>9.0f} {r['completed']:>10d} {r['started']:>8d} {r['pruned']:>7d} {per_hour:>9.1f} {completed_per_hour:>12.1f} "
            f"{r['best_auc']:>12.4f} {r['peak_rss_mb']:>15.0f} {r['precision'] or 'float32':>15}"
        )


def _print_hardware(args: argparse.Namespace, precision: str) -> None:
    sys.path.insert(0, str(REPO))
    from sweep.tf_quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    rates = matmul_rates()
    policy = precision or "float32"
    gflops, images_per_s, cut = cached_step_rate(args.size, policy, unfreeze=3)
    peak = rates["bfloat16"] if "bfloat16" in policy else rates["float32"]
    print(f"\nmatrix multiply (2048x2048): float32 {rates['float32']:.0f} GFLOP/s, bfloat16 {rates['bfloat16']:.0f} GFLOP/s")
    print(
        f"cached training step above {cut} ({policy}, batch 32): {gflops:.0f} GFLOP/s, {images_per_s:.0f} images/s, "
        f"{100 * gflops / peak:.0f}% of the measured {policy.replace('mixed_', '')} matrix rate"
    )


def _print_memory(result: dict[str, Any]) -> None:
    rss = [(n, v) for n, v in result["rss_by_trial"] if v is not None]
    if len(rss) < 2:
        return
    workers = result.get("workers", 1)
    print(f"\nworker resident memory after each trial, pruned ones included ({workers} worker process{'es' if workers != 1 else ''}), MiB:")
    print("  " + ", ".join(f"#{n}: {v:.0f}" for n, v in rss))
    second, last = rss[1][1], rss[-1][1]
    print(f"after trial {len(rss)} vs after trial 2: {last:.0f} vs {second:.0f} MiB ({100 * (last / second - 1):+.1f}%)")
    anon = [(n, v) for n, v in result.get("anon_by_trial", []) if v is not None]
    if len(anon) >= 2:
        first, final = anon[1][1], anon[-1][1]
        print(f"anonymous memory alone, after trial {len(anon)} vs after trial 2: {final:.0f} vs {first:.0f} MiB ({100 * (final / first - 1):+.1f}%)")


if __name__ == "__main__":
    raise SystemExit(main())
