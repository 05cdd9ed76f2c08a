"""optuna-dashboard on a study's storage, bound to the loopback interface."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from sweep.config import Config
from sweep.errors import SweepError
from sweep.report import load_study

HOST = "127.0.0.1"


def dashboard_command(config: Config, port: int) -> list[str]:
    """Return the optuna-dashboard command line for the configured storage."""
    executable = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) or shutil.which("optuna-dashboard")
    if executable is None:
        raise SweepError("optuna-dashboard is not installed; run `pip install optuna-dashboard` (it is a dependency of sweep)")
    return [executable, config.study.storage_url, "--host", HOST, "--port", str(port)]


def run_dashboard(config: Config, port: int) -> int:
    """Start optuna-dashboard in the foreground and return its exit status."""
    if not 1 <= port <= 65535:
        raise SweepError(f"--port must be between 1 and 65535, but got {port}")
    load_study(config)
    command = dashboard_command(config, port)
    print(f"optuna-dashboard for study '{config.study.name}' at http://{HOST}:{port}/ (Ctrl+C stops it)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
