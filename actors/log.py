"""Structured logging for the runtime: structlog, console by default, JSON on request."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure(format: str = "console", level: str | int = "INFO") -> None:
    """Configure structlog process-wide.

    `format` is "console" (human readable, the default) or "json" (one JSON object a
    line, for log shippers). `level` is a logging level name or number.
    """
    if format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', not {format!r}")
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
