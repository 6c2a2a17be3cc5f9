"""Console logging policy for the command-line entry points."""

from __future__ import annotations

import logging


class _QuietLibraries(logging.Filter):
    """Orbax and the array store log every file they touch at INFO; keep their warnings and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/jax/_src/", "/tensorstore/"))
        return record.levelno >= logging.WARNING or not noisy


def quiet_library_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
