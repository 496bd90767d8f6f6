"""The one fault model of the expert calls, and the one classifier of Ray and data-plane errors.

A call to an expert-shard replica fails in one of four ways (`docs/design.md`, "Faults"):
- **died**: its process is gone (EOF or a reset on the channel's socket; Ray's `ActorDiedError`, Serve's
  `ReplicaUnavailableError`); its rows go to another replica at once;
- **hung**: alive, sockets open, no answer within a deadline from the channel's own recent round trip
  (a stalled GPU or node, a SIGSTOPped process); taken out of use until it answers a probe;
- **refused**: either side refused a frame (out of sequence, oversized, wrong dtype, a bad header):
  the channel is out of step, so it is closed and never reused;
- otherwise the replica's own code raised: not retried (the same rows would fail anywhere).

The first three end the channel and raise `PeerGoneError`, the one retryable error: the caller
(`ShardedExperts`) sends the rows to a sibling replica holding the same experts, or waits for a new
replica until `shard_timeout_s`, then raises `ShardUnavailableError` (HTTP 503).
"""

from __future__ import annotations

from typing import Literal

FaultKind = Literal["died", "hung", "refused"]
FAULT_KINDS: tuple[FaultKind, ...] = ("died", "hung", "refused")
# Serve's errors for "the replica this call went to is gone or not there yet" (present in Ray 2.60)
SERVE_GONE = ("DeploymentUnavailableError", "ReplicaUnavailableError")


class PeerGoneError(ConnectionError):
    """This call's replica died, hung or refused the frame: the channel is closed; retry elsewhere."""

    def __init__(self, message: str, kind: FaultKind = "died") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[object, ...]:
        return (PeerGoneError, (str(self), self.kind))


class ShardUnavailableError(RuntimeError):
    """No live replica of an expert shard answered within `shard_timeout_s` (HTTP 503)."""


class DispatcherUnavailableError(RuntimeError):
    """The dispatcher's process died and no replacement answers yet (HTTP 503)."""


def fault_kind(e: BaseException) -> FaultKind | None:
    """How a call to a replica failed, when the fault is the replica's (retry it elsewhere); None for an
    error the replica's own code raised (Ray's `RayTaskError`) or any other error (not retryable).

    Measured on Ray 2.60: a Serve handle call whose replica is killed mid-call raises `ActorDiedError`
    at once (the next call waits in Serve's router for the replacement); an unreachable replica gives
    `ActorUnavailableError` (both `RayActorError`s); a replica gone between Serve's choice and the send
    gives `ReplicaUnavailableError`. Ray actor handles add `WorkerCrashedError` / `ObjectLostError`."""
    if isinstance(e, PeerGoneError):
        return e.kind
    import ray.exceptions as rex
    import ray.serve.exceptions as sex

    if isinstance(e, rex.RayTaskError):
        return None
    gone = (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError)
    gone += tuple(getattr(sex, name) for name in SERVE_GONE if hasattr(sex, name))
    return "died" if isinstance(e, gone) else None


def busy(e: BaseException) -> bool:
    """Serve refused the call because the deployment's queue is full (`BackPressureError`): overload,
    not a fault of any replica (HTTP 429 for a client; another try later for a shard call)."""
    import ray.serve.exceptions as sex

    return isinstance(e, getattr(sex, "BackPressureError", ()))


def unavailable(e: BaseException) -> bool:
    """True when `e` means "no engine or shard to serve this right now" (HTTP 503, retry later): a
    replica that died or is not there yet, a shard or dispatcher with no live replica, Serve itself."""
    if isinstance(e, (ShardUnavailableError, DispatcherUnavailableError)) or fault_kind(e) is not None:
        return True
    import ray.serve.exceptions as sex

    return isinstance(e, sex.RayServeException)
