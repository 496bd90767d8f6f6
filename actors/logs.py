"""Logging inside actors and Serve replicas: moray's loggers at INFO to stderr (Ray's worker log files)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s pid=%(process)d: %(message)s"


def setup_actor_logging(level: int = logging.INFO) -> None:
    """Idempotent: one stderr handler on the `moray` logger, so request-id lines reach the worker logs."""
    logger = logging.getLogger("moray")
    logger.setLevel(level)
    if not any(getattr(h, "_moray", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._moray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
