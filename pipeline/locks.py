"""Runs that share a work dir (two terminals, a laptop and a cluster job) must not break each
other. Two kinds of lease, both plain objects in the work dir, so they work on S3 as on a local
disk, both renewed by a heartbeat and taken over once their holder stops renewing them:

* a **stage lock** (``<stage>/<fingerprint>/_lock.json``, created with an exclusive create --
  ``O_EXCL`` locally, a conditional PUT on S3): one run at a time computes a given output; a
  second one fails at once, naming the first (its host, pid, start and pipeline run).
* a **reader lease** (``<work_dir>/_readers/<id>.json``): the stage folders a running pipeline
  may read. A commit never deletes an earlier attempt of a stage that a live reader names; the
  attempt is removed by a later commit, once no reader needs it.

A lease whose holder is gone -- a dead pid on this host, or no heartbeat for ``ttl_s`` -- is
stale and is taken over (a killed run never blocks the next one for longer than that).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from pipeline import storage as st

LOCK_FILE = "_lock.json"
READERS = "_readers"
TTL_S = 120.0  # a holder renews every TTL_S / 4; a lease this old belongs to a run that is gone


class StageBusy(RuntimeError):
    """Another run is computing the same stage output right now."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still exists (a run on another host cannot be asked)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(run: Optional[str]) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "run": run, "started": time.time()}


def process_gone(host: Optional[str], pid: Any) -> bool:
    """Whether the process that wrote a lease or started a run is known to be gone: it ran on
    this host and its pid no longer exists (a process elsewhere cannot be asked)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    return host == socket.gethostname() and pid > 0 and not pid_alive(pid)


def is_stale(lease: dict[str, Any], ttl_s: float = TTL_S) -> bool:
    if process_gone(lease.get("host"), lease.get("pid")):
        return True
    return time.time() - float(lease.get("heartbeat", lease.get("started", 0))) > ttl_s


def describe(lease: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    run = f", pipeline run {lease['run']}" if lease.get("run") else ""
    return f"pid {lease.get('pid')} on {lease.get('host')} since {started}{run}"


class _Heartbeat:
    """Rewrites a lease object every ``ttl_s / 4`` with a fresh ``heartbeat`` time."""

    def __init__(self, storage: st.Storage, uri: str, lease: dict[str, Any], ttl_s: float):
        self.storage, self.uri, self.lease, self.ttl_s = storage, uri, lease, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {uri}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.storage.write_json_atomic(self.uri, {**self.lease, "heartbeat": time.time()})
            except OSError:  # a transient storage error: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StageLock:
    """The exclusive right to compute one stage output (its fingerprint folder)."""

    def __init__(self, storage: st.Storage, stage_dir: str, stage: str, run: Optional[str] = None, ttl_s: float = TTL_S):
        self.storage, self.stage_dir, self.stage, self.ttl_s = storage, stage_dir, stage, ttl_s
        self.uri = st.join(stage_dir, LOCK_FILE)
        self.lease = _owner(run)
        self._heartbeat: Optional[_Heartbeat] = None

    def acquire(self) -> None:
        body = {**self.lease, "heartbeat": time.time()}
        for _ in range(2):  # a second try after taking over a stale lock
            if self.storage.create_exclusive(self.uri, json.dumps(body).encode()):
                self._heartbeat = _Heartbeat(self.storage, self.uri, self.lease, self.ttl_s)
                self._heartbeat.start()
                return
            try:
                holder = self.storage.read_json(self.uri)
            except (FileNotFoundError, ValueError):  # released meanwhile, or caught mid-write
                continue
            if not is_stale(holder, self.ttl_s):
                raise StageBusy(f"stage {self.stage!r} ({self.stage_dir}) is being computed by another run: {describe(holder)};"
                                f" wait for it to finish (or stop it) and run again")
            self.storage.rm(self.uri)
        raise StageBusy(f"stage {self.stage!r} ({self.stage_dir}): could not take its lock ({self.uri}); try again")

    def release(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
            self.storage.rm(self.uri)

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ReaderLease:
    """The stage folders a running pipeline may read, published for the commits of other runs."""

    def __init__(self, storage: st.Storage, work_dir: str, stage_dirs: list[str], run: Optional[str] = None, ttl_s: float = TTL_S):
        self.storage, self.ttl_s = storage, ttl_s
        self.id = uuid.uuid4().hex
        self.uri = st.join(work_dir, READERS, f"{self.id}.json")
        self.lease = {**_owner(run), "stage_dirs": sorted(set(stage_dirs))}
        self._heartbeat: Optional[_Heartbeat] = None

    def __enter__(self) -> "ReaderLease":
        self.storage.write_json_atomic(self.uri, {**self.lease, "heartbeat": time.time()})
        self._heartbeat = _Heartbeat(self.storage, self.uri, self.lease, self.ttl_s)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.storage.rm(self.uri)


def live_readers(storage: st.Storage, work_dir: str, stage_dir: str, ignore: Optional[str] = None,
                 ttl_s: float = TTL_S) -> list[dict[str, Any]]:
    """The live reader leases (other than ``ignore``, a lease id) that name ``stage_dir``."""
    folder = st.join(work_dir, READERS)
    out = []
    for uri in storage.find_files(folder) if storage.exists(folder) else []:
        if not uri.endswith(".json") or (ignore and uri.endswith(f"/{ignore}.json")):
            continue
        try:
            lease = storage.read_json(uri)
        except (FileNotFoundError, ValueError):
            continue
        if stage_dir in lease.get("stage_dirs", []) and not is_stale(lease, ttl_s):
            out.append(lease)
    return out
