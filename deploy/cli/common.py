"""What every command shares: one-line errors (exit code 2) and a Ray connection as a second driver."""

from __future__ import annotations

import logging
import sys

from moray.deploy.api.client import use_token
from moray.deploy.serve.network import join_address

EXIT_USAGE = 2


def fail(message: str) -> int:
    """One line on stderr (whitespace, newlines included, collapsed), exit code 2."""
    sys.stderr.write(f"moray: error: {' '.join(message.split())}\n")
    return EXIT_USAGE


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, or its class name."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def connect_ray(address: str | None, auth_token: str | None) -> None:
    """Join the Ray cluster at `address` (default $RAY_ADDRESS, else "auto") in Serve's namespace, with
    the cluster's auth token when given (see `moray.deploy.api.client` on token authentication)."""
    import ray

    if ray.is_initialized():
        return
    if auth_token:
        use_token(auth_token)
    ray.init(address=join_address(address), namespace="serve", log_to_driver=False,
             logging_level=logging.WARNING)
