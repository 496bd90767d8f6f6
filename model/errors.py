"""The engine's request errors, in a module of their own: the API's error mapping (and so the CLI and the
Python client, which share it) imports them without loading torch and the model."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that can never be served (too long, empty): the client's fault (HTTP 400)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting` (HTTP 429)."""
