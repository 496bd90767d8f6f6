"""moray: an expert-parallel Mixtral server on Ray.

The import name `moray` maps to this directory; `moray.model`, `moray.actors` and
`moray.deploy` map to the folders beside it (see pyproject's `package-dir`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moray.deploy.api.client import MorayClient


def connect(address: str = "auto", app: str = "moray", **kwargs: Any) -> MorayClient:
    """Connect to a running moray Serve application (see `moray.deploy.api.client.connect`)."""
    from moray.deploy.api.client import connect as _connect

    return _connect(address=address, app=app, **kwargs)
