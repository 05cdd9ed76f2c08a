"""Exceptions shared by the package."""

from __future__ import annotations


class SweepError(Exception):
    """An error caused by the user's input or environment; the CLI prints its message on one line and exits with status 2."""
