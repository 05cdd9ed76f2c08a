"""Exceptions shared by the package."""

from __future__ import annotations


class SweepError(Exception):
    """An error caused by the user's input or environment; the CLI prints its message on one line and exits with status 2."""


class WorkerError(Exception):
    """A worker process running trials exited with a non-zero status; its own output explains why."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"a worker process exited with status {exit_code}; its messages are above")
        self.exit_code = exit_code
