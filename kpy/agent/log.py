"""Logging setup: structlog, console output on a TTY and JSON lines otherwise.

Logs go to stderr, always: stdout carries only what a command was asked to print
(``kpy plan -o json`` must stay parseable whatever the input warns about). Every
``kpy`` command configures logging before it runs (:func:`ensure_configured` in the
command group); structlog's own default — printing to stdout — is never used.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class _StderrLoggerFactory:
    """A ``PrintLogger`` on whatever ``sys.stderr`` is when the logger is made (a test
    runner or click may swap the stream after logging was configured)."""

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        stream: TextIO = sys.stderr
        return structlog.PrintLogger(file=stream)


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process. ``fmt``: auto, console or json."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def ensure_configured() -> None:
    """Configure logging (to stderr) unless something already did."""
    if not structlog.is_configured():
        configure()
