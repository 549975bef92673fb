"""structlog, configured once at the entry point: readable on a terminal, JSON lines
otherwise; always on stderr so stdout stays for plans and reports. Host and plugin
are bound through contextvars (xenrun.run), never passed by hand."""

from __future__ import annotations

import contextvars
import logging
import sys
from contextlib import contextmanager

import structlog

_QUIET = contextvars.ContextVar("xenrun_quiet", default=False)


@contextmanager
def quiet():
    """No log events inside: for a speculative pass over code whose real pass
    follows (an SSH host's read-ahead), so nothing is said twice."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _drop_when_quiet(logger, method, event):
    if _QUIET.get():
        raise structlog.DropEvent
    return event


def configure(level: str = "info") -> None:
    tty = sys.stderr.isatty()
    renderer = structlog.dev.ConsoleRenderer(colors=True) if tty else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            _drop_when_quiet,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # WriteLogger writes message and newline at once, so lines from the
        # threads of a fleet run never interleave
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
