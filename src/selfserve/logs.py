"""Structured logging: JSON in production, readable in development."""

from __future__ import annotations

import logging
import sys

import structlog


def _stderr_logger(*_: object) -> structlog.PrintLogger:
    """A logger on whatever `sys.stderr` is when it logs (not when logging was set up),
    so a replaced stream (a test runner's capture, a daemon's redirect) is followed."""
    return structlog.PrintLogger(sys.stderr)


def configure_logging(fmt: str = "console", level: str = "INFO") -> None:
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
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
            logging.getLevelName(level) if isinstance(logging.getLevelName(level), int) else 20
        ),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")


def mask_phone(phone: str | None) -> str | None:
    """+8613812345678 -> +86138****5678: enough for support, no more."""
    if not phone:
        return phone
    if len(phone) <= 7:
        return "*" * len(phone)
    return phone[:-8] + "****" + phone[-4:]
