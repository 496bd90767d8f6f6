"""Where shard replicas announce their data-plane endpoints: Ray's cluster key-value store (the GCS).

This is the control plane's one ordinary call per replica: a replica puts its endpoint under
`moray/dataplane/<group>/<shard>/<replica>` when it starts and deletes it when it drains; the
dispatchers list the group's keys every second and open channels to the replicas they do not know.
A replica killed without draining leaves its key behind: a dispatcher that cannot connect to it
for `STALE_S` deletes it (its channels already noticed the death on the socket).
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "moray"
PREFIX = "moray/dataplane/"
STALE_S = 30.0  # an endpoint nobody could connect to for this long is forgotten


class Directory:
    def __init__(self, group: str) -> None:
        if "/" in group:
            raise ValueError(f"data-plane group names cannot contain '/': {group!r}")
        self.group = group

    def _key(self, shard: int, replica: str) -> bytes:
        return f"{PREFIX}{self.group}/{shard}/{replica}".encode()

    def announce(self, shard: int, replica: str, endpoint: dict[str, Any]) -> None:
        from ray.experimental import internal_kv

        value = json.dumps({**endpoint, "shard": shard, "replica": replica}).encode()
        internal_kv._internal_kv_put(self._key(shard, replica), value, overwrite=True, namespace=NAMESPACE)

    def retract(self, shard: int, replica: str) -> None:
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            internal_kv._internal_kv_del(self._key(shard, replica), namespace=NAMESPACE)

    def clear(self) -> None:
        """Forget every endpoint of this group (its replicas are all gone)."""
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            prefix = f"{PREFIX}{self.group}/".encode()
            internal_kv._internal_kv_del(prefix, del_by_prefix=True, namespace=NAMESPACE)

    def endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint announced in this group (blocking: a few GCS calls)."""
        from ray.experimental import internal_kv

        found = []
        for key in internal_kv._internal_kv_list(f"{PREFIX}{self.group}/".encode(), namespace=NAMESPACE):
            value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
            if value:
                try:
                    found.append(json.loads(value))
                except ValueError:
                    log.warning("ignoring a malformed data-plane endpoint under %r", key)
        return found
