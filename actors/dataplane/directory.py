"""Where shard replicas announce their data-plane endpoints: Ray's cluster key-value store (the GCS).

A registration belongs to its replica: the replica puts its endpoint under
`moray/dataplane/<group>/<shard>/<replica>` when it starts, puts it again every `HEARTBEAT_S` with a
`beat` that moves (`Heartbeat`), and deletes it when it drains. The dispatchers list the group's keys
every second and open channels to the live replicas they do not know: a key whose beat has not moved
for `STALE_S` (by the reader's own clock: no clocks compared across nodes) is a replica killed without
draining, or one paused; it is not dialled. A key still for `FORGET_S` is deleted (`forget`); a
replica that was only paused puts it back with its next beat, so no dispatcher can remove a live one.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "moray"
PREFIX = "moray/dataplane/"
HEARTBEAT_S = 2.0  # how often a replica puts its endpoint again
STALE_S = 15.0  # a key whose beat has not moved for this long is not dialled
FORGET_S = 120.0  # ... and for this long is deleted


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

    def forget(self, shard: int, replica: str, beat: object) -> None:
        """Delete a replica's key if its beat is still `beat` (it stopped beating; if it was only paused,
        its next beat puts the key back)."""
        from ray.experimental import internal_kv

        value = internal_kv._internal_kv_get(self._key(shard, replica), namespace=NAMESPACE)
        if value and json.loads(value).get("beat") == beat:
            internal_kv._internal_kv_del(self._key(shard, replica), namespace=NAMESPACE)

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


class Heartbeat:
    """A replica's registration, put again every `HEARTBEAT_S` with a moving `beat` until `stop()`
    (which deletes it)."""

    def __init__(self, directory: Directory, shard: int, replica: str, endpoint: dict[str, Any],
                 interval_s: float = HEARTBEAT_S) -> None:
        self.directory, self.shard, self.replica, self.endpoint = directory, shard, replica, endpoint
        self.interval_s, self.beat = interval_s, 0
        self._stop = threading.Event()
        self.put()  # registered before the constructor returns
        self._thread = threading.Thread(target=self._run, name="moray-heartbeat", daemon=True)
        self._thread.start()

    def put(self) -> None:
        self.beat += 1
        self.directory.announce(self.shard, self.replica, {**self.endpoint, "beat": self.beat})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.put()
            except Exception as e:  # noqa: BLE001 - the GCS restarting: beat again next time
                log.warning("data-plane heartbeat of shard %d replica %s failed: %s", self.shard,
                            self.replica, e)

    def stop(self) -> None:
        """Stop beating and delete the registration."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.directory.retract(self.shard, self.replica)
