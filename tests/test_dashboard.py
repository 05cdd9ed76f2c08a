"""Tests for sweep.dashboard: a real optuna-dashboard process on 127.0.0.1 serving the study."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO, data_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def test_dashboard_serves_study(tiny_study: Path) -> None:
    port = _free_port()
    env = dict(os.environ, SWEEP_DATA_DIR=str(data_dir()))
    process = subprocess.Popen(
        [sys.executable, "-m", "sweep", "dashboard", str(tiny_study), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        body = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                body = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                time.sleep(0.5)
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
        assert studies[0]["directions"] == ["maximize"]
        detail = json.loads(_get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}"))
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
        attrs = {a["key"] for a in detail["trials"][0]["user_attrs"]}
        assert {"val_auc_mean", "val_auc_std"} <= attrs
        page = _get(f"http://127.0.0.1:{port}/dashboard")
        assert b"<html" in page.lower()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}/" in output


def test_dashboard_without_study(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"study:\n  name: none\n  dir: {tmp_path / 'study'}\n")
    result = subprocess.run([sys.executable, "-m", "sweep", "dashboard", str(config)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "study database not found" in result.stderr
    assert not (tmp_path / "study").exists()
