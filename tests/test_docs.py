"""Tests that the READMEs document every config key and the same user commands."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from sweep.config import Config

REPO = Path(__file__).resolve().parents[1]


def _keys() -> list[str]:
    keys = []
    for section, field in Config.model_fields.items():
        models = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        keys.extend(f"{section}.{name}" for name in models[0].model_fields)
    return keys


def test_readme_documents_every_key() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [key for key in _keys() if f"| `{key}` |" not in readme]
    assert missing == []


def test_chinese_readme_has_same_commands() -> None:
    english = (REPO / "README.md").read_text(encoding="utf-8")
    chinese = (REPO / "README.zh-CN.md").read_text(encoding="utf-8")
    commands = set(re.findall(r"^make \w+", english, flags=re.MULTILINE))
    assert commands == {"make install", "make weights", "make sweep", "make report", "make export", "make dashboard", "make train", "make test"}
    for command in commands:
        assert command in chinese
    for verb in ("run", "doctor", "report", "export", "dashboard", "train", "predict", "weights"):
        assert f"sweep {verb}" in chinese
