"""One writer per output: a lease at ``OUTPUT/_ledger/lease.json``, taken before a run plans anything.

Ray-free. The lease is created atomically (a hard link of a complete temporary file locally, a conditional
PUT with ``If-None-Match: *`` on S3), so of two runs that start together exactly one gets it. It names its
holder (run id, command, host, process, start time) and an expiry that a thread of the holder pushes
forward every ``RENEW_S`` seconds while the run lives (in ``lease-<token>.json`` beside it: a renewal never
rewrites the lease, so it cannot put back one that another run has broken). A lease is free once its
holder is gone: on the same host, as soon as its process has exited (a SIGKILL included); from another
host, once its expiry has passed (``TTL_S`` after the last renewal, so a crashed run blocks the next for at
most that long).

A run that finds the lease held stops at once (`LeaseHeld`, exit 1) naming the holder, or waits up to
``--wait-for-lock SECONDS`` for it; ``--break-lock`` takes it whatever its state, for an operator who
knows the holder is dead. A holder whose renewal finds another run's lease in place (someone broke it)
has lost it: ``check()`` raises before the run commits its end.

Every command that writes an output takes it: extract, classify, nightly, `heads predict` (its output),
`index build` and `index add`; ``--overwrite`` clears the output under it and keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pipeline import storage
from pipeline.output.layout import LEDGER_DIR

LEASE = "lease.json"
LEASE_PREFIX = "lease"  # the lease and its renewals (lease-<token>.json): what --overwrite keeps
TTL_S = 120.0  # a lease not renewed for this long is free
RENEW_S = 20.0  # how often the holder renews it
POLL_S = 2.0  # how often a waiting run looks again


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (or took it over from this one)."""


@dataclass(frozen=True)
class LockPolicy:
    """What a run does when the lease is held: wait up to ``wait_s`` seconds; ``break_lock`` takes it."""

    wait_s: float = 0.0
    break_lock: bool = False


def lease_uri(output_uri: str) -> str:
    return storage.join(output_uri, LEDGER_DIR, LEASE)


def beat_uri(output_uri: str, token: str) -> str:
    """Where a holder renews its lease: a file of its own, so that a renewal never rewrites the lease
    itself (and so never puts back one that another run has just broken)."""
    return storage.join(output_uri, LEDGER_DIR, f"lease-{token}.json")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def free_because(holder: dict[str, Any] | None, now: datetime | None = None) -> str | None:
    """Why a lease is free to take (None while its holder may still be writing); ``holder`` as `Lease.read`
    returns it (its expiry the later of the lease's and its last renewal's)."""
    if holder is None:
        return "it is unreadable"
    now = now or _now()
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host has exited"
    try:
        expires = datetime.fromisoformat(holder["expires_at"])
    except (KeyError, TypeError, ValueError):
        return "it has no valid expiry"
    if now >= expires:
        return f"it expired at {holder['expires_at']}"
    return None


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        out = json.loads(storage.read_bytes(uri))
    except (storage.StorageError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def describe(holder: dict[str, Any]) -> str:
    h = {k: holder.get(k, "?") for k in ("run_id", "command", "host", "pid", "started_at")}
    return (f"run {h['run_id']} ({h['command']}) on host {h['host']}, process {h['pid']}, "
            f"started {h['started_at']}")


class Lease:
    """The output's lease, held by this process until ``release()``."""

    def __init__(self, output_uri: str, run_id: str, command: str) -> None:
        self.output_uri = output_uri
        self.uri = lease_uri(output_uri)
        self.holder = {"run_id": run_id, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
                       "token": uuid.uuid4().hex, "started_at": _now().isoformat(timespec="seconds")}
        self.lost: str | None = None
        self.took_over: str | None = None  # why an earlier holder's lease was free, when one was replaced
        self.policy = LockPolicy()
        self._made_folder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _expiry() -> str:
        return (_now() + timedelta(seconds=TTL_S)).isoformat(timespec="milliseconds")

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "expires_at": self._expiry()}, indent=1).encode()

    def read(self) -> dict[str, Any] | None:
        """The lease as stored, its expiry pushed to its holder's last renewal (None when it is missing or
        unreadable)."""
        out = _read_json(self.uri)
        if out is not None and isinstance(out.get("token"), str):
            beat = _read_json(beat_uri(self.output_uri, out["token"]))
            if beat and str(beat.get("expires_at", "")) > str(out.get("expires_at", "")):
                out["expires_at"] = beat["expires_at"]
        return out

    def _remove(self, holder: dict[str, Any] | None) -> None:
        """Remove a lease found free (and its holder's renewals)."""
        storage.remove(self.uri)
        if holder is not None and isinstance(holder.get("token"), str):
            storage.remove(beat_uri(self.output_uri, holder["token"]))

    def acquire(self, policy: LockPolicy = LockPolicy()) -> Lease:
        self.policy = policy
        self._made_folder = storage.protocol_of(self.uri) == "file" and not storage.exists(self.output_uri)
        deadline = time.monotonic() + max(0.0, policy.wait_s)
        while True:
            if storage.create_exclusive(self.uri, self._body()):
                break
            current = self.read()
            if not storage.exists(self.uri):
                continue  # released between the two calls
            why = "--break-lock was given" if policy.break_lock else free_because(current)
            if why is not None:
                self._remove(current)
                self.took_over = f"{describe(current or {})}: {why}"
                if storage.create_exclusive(self.uri, self._body()):
                    break
                current = self.read()  # another run took it first
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"output '{self.output_uri}' is being written by {describe(current or {})}; its lease "
                    f"({self.uri}) expires {(current or {}).get('expires_at', '?')}. Wait for it to finish "
                    "(--wait-for-lock SECONDS waits), or pass --break-lock if you know that run is dead")
            time.sleep(min(POLL_S, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.renew()

    def renew(self) -> None:
        """Push the expiry forward, unless another run holds the lease now (then it is lost)."""
        if self.lost:
            return
        try:
            current = self.read()
            if current is None or current.get("token") != self.holder["token"]:
                self.lost = f"the lease is held by {describe(current)}" if current else "it was removed"
                self._stop.set()
                return
            beat = beat_uri(self.output_uri, self.holder["token"])
            storage.write_json(beat, {"expires_at": self._expiry()})
        except (storage.StorageError, OSError):
            pass  # storage briefly unreachable: the next renewal tries again, well before the expiry

    def check(self) -> None:
        """LeaseHeld when this run lost its lease (another run broke it): nothing more may be committed."""
        if self.lost:
            raise LeaseHeld(f"this run lost the lease on output '{self.output_uri}' ({self.lost}); another "
                            "run is writing it: check its result before rerunning")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(storage.StorageError, OSError):
            current = self.read()
            if current is not None and current.get("token") == self.holder["token"]:
                storage.remove(self.uri)
            storage.remove(beat_uri(self.output_uri, self.holder["token"]))
        if self._made_folder:  # a run refused before it wrote anything leaves no folder
            for folder in (storage.join(self.output_uri, LEDGER_DIR), self.output_uri):
                with contextlib.suppress(OSError):
                    os.rmdir(storage.get_fs(folder)[1])


@contextlib.contextmanager
def hold(output_uri: str, run_id: str, command: str, lock: LockPolicy | Lease | None = None
         ) -> Iterator[Lease]:
    """Hold the output's lease for the block; LeaseHeld (before anything is written) when another run has
    it. A lease lost during the block raises when the block ends. ``lock``: what to do when it is held, or
    a lease this run already holds (nightly's, passed to its extract): on the same output it is used as it
    is; on another, its policy applies."""
    if isinstance(lock, Lease):
        if lock.uri == lease_uri(output_uri):
            yield lock
            return
        lock = lock.policy
    lease = Lease(output_uri, run_id, command).acquire(lock or LockPolicy())
    try:
        yield lease
        lease.check()
    finally:
        lease.release()
