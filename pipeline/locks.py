"""Runs that share a work dir (two terminals, a laptop and a cluster job) must not break each
other. Two kinds of lease, both plain objects in the work dir, so they work on S3 as on a local
disk, both renewed by a heartbeat and taken over once their holder stops renewing them:

* a **stage lock** (``<stage>/<fingerprint>/_lock.json``): one run at a time computes a given
  output; a second one fails at once, naming the first (its host, pid, start and pipeline run).
* a **reader lease** (``<work_dir>/_readers/<id>.json``): the stage folders a running pipeline
  may read. A commit never deletes an earlier attempt of a stage that a live reader names; the
  attempt is removed by a later commit, once no reader needs it.

Leases are fenced, so that a holder that stopped for a while (a laptop asleep, a process
stopped, minutes of storage errors) can never write over the run that took its place:

* A lease carries a **token** (a uuid). Every write of it is conditional on the version this
  holder last wrote (``If-Match`` on the ETag on S3; locally a compare of the content under a
  ``flock``, see :meth:`pipeline.storage.Storage.put_if`): the heartbeat fails as soon as
  another run took the lease over, and the holder stops its stage at the next part or task
  (:class:`LeaseLost`: "lease on <stage> lost to <holder>; this run's attempt was not
  committed"). A heartbeat that cannot reach the storage for ``ttl`` seconds gives the lease up
  the same way, since another run may hold it by then.
* **Staleness** is the lease's age on the storage's own clock -- its ``LastModified`` (mtime)
  against the time the storage stamps on a probe written now -- never another host's clock
  against ours; a lease of a dead pid on this host is stale at once. ``LMPIPE_LEASE_TTL_S``
  sets the time to live (default 120 s; a holder renews every quarter of it).
* **Taking over** is a conditional write over the exact stale version that was read: of two
  runs that find the same stale lease, one gets it and the other is told the stage is busy.
* **The commit** (``_manifest.json``) renews the lease first (the token is still ours, with a
  fresh ttl) and is itself conditional on the manifest version seen when the lock was taken, so
  that a commit made meanwhile by another run is never overwritten. **Deletions** of attempt
  folders renew the lease first too, and a new holder only deletes at once the attempts whose
  run is known to be gone (a dead pid on this host, recorded in the attempt's ``_lease.json``);
  the others go after its own commit, when no earlier holder can commit any more (the manifest
  changed under their condition).

What fencing cannot close on S3: a check and the write after it are two requests. A holder that
renews, then stops for longer than ``ttl`` before its commit lands, then resumes, commits only
if the run that took over has not committed yet (the manifest PUT is conditional); the run that
took over then fails at its own commit instead of overwriting. The window is the time between
two requests, not the minutes of a pause.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

from pipeline import manifest as mf
from pipeline import storage as st

log = logging.getLogger("lmpipe")

LOCK_FILE = "_lock.json"
READERS = "_readers"
DEFAULT_TTL_S = 120.0  # a holder renews every ttl / 4; a lease this old belongs to a run that is gone
TTL_ENV = "LMPIPE_LEASE_TTL_S"


def lease_ttl_s() -> float:
    """The lease time to live: ``LMPIPE_LEASE_TTL_S`` seconds, else 120."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_S
    try:
        ttl = float(raw)
    except ValueError:
        raise ValueError(f"{TTL_ENV}={raw!r}: not a number of seconds") from None
    if not ttl > 0:
        raise ValueError(f"{TTL_ENV}={raw!r}: must be more than 0 seconds")
    return ttl


class StageBusy(RuntimeError):
    """Another run is computing the same stage output right now."""


class LeaseLost(RuntimeError):
    """Another run took this run's lease over (or it could not be renewed for its ttl)."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still exists (a run on another host cannot be asked)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_fields(run: Optional[str]) -> dict[str, Any]:
    """Who holds a lease, for messages and for the pid check (``started`` is only shown)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "run": run, "started": time.time()}


def process_gone(host: Optional[str], pid: Any) -> bool:
    """Whether the process that wrote a lease or started a run is known to be gone: it ran on
    this host and its pid no longer exists (a process elsewhere cannot be asked)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    return host == socket.gethostname() and pid > 0 and not pid_alive(pid)


def is_stale(lease: dict[str, Any], age_s: float, ttl_s: float) -> bool:
    """``age_s``: the lease's age on the storage's clock (``Storage.now`` - its ``modified``)."""
    return process_gone(lease.get("host"), lease.get("pid")) or age_s > ttl_s


def describe(lease: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    run = f", pipeline run {lease['run']}" if lease.get("run") else ""
    return f"pid {lease.get('pid')} on {lease.get('host')} since {started}{run}"


def parse_lease(data: bytes) -> dict[str, Any]:
    """A lease's fields; ``{}`` for an object that is not one (it is judged by its age alone)."""
    try:
        lease = json.loads(data)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


class Lease:
    """One lease object, held by this process while the object carries its token, renewed by a
    heartbeat thread with conditional writes."""

    def __init__(self, storage: st.Storage, uri: str, what: str, fields: dict[str, Any], ttl_s: Optional[float] = None,
                 on_loss: str = "this run's attempt was not committed",
                 when_gone: str = "another run, which has released it since"):
        self.storage, self.uri, self.what, self.on_loss, self.when_gone = storage, uri, what, on_loss, when_gone
        self.ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
        self.token = uuid.uuid4().hex
        self.body: dict[str, Any] = {**fields, "token": self.token, "beat": 0}
        self.version: Optional[str] = None  # what this holder last wrote
        self.lost: Optional[str] = None  # why the lease is no longer ours, once it is not
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._renewed_at = time.monotonic()

    # -- taking it --------------------------------------------------------------------------
    def create(self) -> bool:
        """Take the lease if no one holds it (the object does not exist)."""
        return self._write_over(None)

    def take_over(self, stale_version: str) -> bool:
        """Take the lease over from a stale holder: only if the object is still that version."""
        return self._write_over(stale_version)

    def _write_over(self, version: Optional[str]) -> bool:
        try:
            self.version = self.storage.put_if(self.uri, st.json_bytes(self.body), version)
        except st.PreconditionFailed:
            return False
        self._renewed_at = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.uri}", daemon=True)
        self._thread.start()
        return True

    # -- holding it -------------------------------------------------------------------------
    def renew(self) -> None:
        """Write the next beat over this holder's own last version; :class:`LeaseLost` when the
        object is another version (another run took it over) or gone."""
        with self._mutex:
            self.check()
            body = {**self.body, "beat": self.body["beat"] + 1}
            try:
                self.version = self.storage.put_if(self.uri, st.json_bytes(body), self.version)
            except st.PreconditionFailed:
                if not self._still_ours():
                    self.lost = self._loss_message()
                    raise LeaseLost(self.lost) from None
                self.version = self.storage.put_if(self.uri, st.json_bytes(body), self.version)
            self.body = body
            self._renewed_at = time.monotonic()

    def _still_ours(self) -> bool:
        """After a failed condition: whether the object still carries our token (a write of ours
        whose answer was lost, then retried): then its version becomes the one we hold."""
        try:
            current = self.storage.read_versioned(self.uri)
        except FileNotFoundError:
            return False
        if parse_lease(current.data).get("token") != self.token:
            return False
        self.version = current.version
        return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` once the heartbeat found the lease taken or unrenewable."""
        if self.lost:
            raise LeaseLost(self.lost)

    def _loss_message(self) -> str:
        try:
            holder = describe(parse_lease(self.storage.read_versioned(self.uri).data))
        except (FileNotFoundError, OSError):
            holder = self.when_gone
        return f"lease on {self.what} lost to {holder}; {self.on_loss}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except Exception as e:  # a storage error: the next beat tries again, while the lease may still be ours
                if time.monotonic() - self._renewed_at > self.ttl_s:
                    self.lost = (f"lease on {self.what} could not be renewed for {self.ttl_s:.0f}s ({type(e).__name__}: {e});"
                                 f" another run may hold it now; {self.on_loss}")
                    log.error("%s", self.lost)
                    return
                log.warning("could not renew the lease on %s (%s: %s); trying again", self.what, type(e).__name__, e)

    # -- giving it back ---------------------------------------------------------------------
    def release(self) -> None:
        """Stop the heartbeat and delete the object if it is still this holder's version (never
        a lease another run took over)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5 + self.ttl_s / 4)
            self._thread = None
        with self._mutex:
            if self.version is None or self.lost:
                return
            try:
                self.storage.delete_if(self.uri, self.version)
            except st.PreconditionFailed:
                if self._still_ours():
                    self.storage.delete_if(self.uri, self.version)
            self.version = None


class StageLock:
    """The exclusive right to compute one stage output (its fingerprint folder)."""

    def __init__(self, storage: st.Storage, stage_dir: str, stage: str, run: Optional[str] = None, ttl_s: Optional[float] = None):
        self.storage, self.stage_dir, self.stage = storage, stage_dir, stage
        self.uri = st.join(stage_dir, LOCK_FILE)
        self.lease = Lease(storage, self.uri, stage, holder_fields(run), ttl_s)
        self.ttl_s = self.lease.ttl_s
        self.manifest_version: Optional[str] = None  # the commit marker as it was when the lock was taken

    @property
    def token(self) -> str:
        return self.lease.token

    @property
    def holder(self) -> dict[str, Any]:
        """Who holds the lock (its token, host, pid, run), as an attempt folder records it."""
        return {k: v for k, v in self.lease.body.items() if k != "beat"}

    def acquire(self) -> None:
        self._take()
        self.manifest_version = self.storage.version_of(mf.manifest_uri(self.stage_dir))

    def _take(self) -> None:
        for _ in range(3):  # tries again when the lock changed between our look and our write
            if self.lease.create():
                return
            try:
                current = self.storage.read_versioned(self.uri)
            except FileNotFoundError:  # released meanwhile
                continue
            holder = parse_lease(current.data)
            age = self.storage.now(self.stage_dir) - current.modified
            if not is_stale(holder, age, self.ttl_s):
                raise StageBusy(f"stage {self.stage!r} ({self.stage_dir}) is being computed by another run: {describe(holder)};"
                                f" wait for it to finish (or stop it) and run again")
            if self.lease.take_over(current.version):
                log.warning("[%s] took over the lock of %s: no heartbeat for %.0fs (ttl %.0fs) or its process is gone",
                            self.stage, describe(holder), age, self.ttl_s)
                return
        raise StageBusy(f"stage {self.stage!r} ({self.stage_dir}): could not take its lock ({self.uri}); try again")

    def check(self) -> None:
        self.lease.check()

    def renew(self) -> None:
        """Before a commit or a deletion: the lock is still ours, with a fresh ttl (LeaseLost if not)."""
        self.lease.renew()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the stage's commit marker: only while the lock is still ours (renewed just
        before, so a take-over needs a full ttl from now) and only over the marker version seen
        when the lock was taken (a commit another run made meanwhile is never overwritten)."""
        self.renew()
        try:
            self.manifest_version = self.storage.put_if(mf.manifest_uri(self.stage_dir), st.json_bytes(manifest), self.manifest_version)
        except st.PreconditionFailed:
            raise LeaseLost(f"lease on {self.stage} lost: another run committed {self.stage_dir} meanwhile;"
                            f" this run's attempt was not committed") from None

    def release(self) -> None:
        self.lease.release()

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ReaderLease:
    """The stage folders a running pipeline may read, published for the commits of other runs."""

    def __init__(self, storage: st.Storage, work_dir: str, stage_dirs: list[str], run: Optional[str] = None,
                 ttl_s: Optional[float] = None):
        self.storage = storage
        self.id = uuid.uuid4().hex
        self.uri = st.join(work_dir, READERS, f"{self.id}.json")
        self.lease = Lease(storage, self.uri, f"the stage folders this run reads ({self.uri})",
                           {**holder_fields(run), "stage_dirs": sorted(set(stage_dirs))}, ttl_s,
                           on_loss="what it reads is no longer protected from other runs' clean-up",
                           when_gone="another run's clean-up, which removed it as stale")
        self.ttl_s = self.lease.ttl_s

    def check(self) -> None:
        self.lease.check()

    def __enter__(self) -> "ReaderLease":
        if not self.lease.create():
            raise RuntimeError(f"{self.uri}: a reader lease with this id exists already")
        return self

    def __exit__(self, *exc) -> None:
        self.lease.release()


def reader_leases(storage: st.Storage, work_dir: str, ttl_s: Optional[float] = None) -> list[tuple[str, st.Versioned, dict[str, Any], bool]]:
    """Every reader lease of the work dir: (uri, object, fields, stale)."""
    ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
    folder = st.join(work_dir, READERS)
    if not storage.exists(folder):
        return []
    now = None
    out = []
    for uri in storage.find_files(folder):
        if not uri.endswith(".json"):
            continue
        try:
            obj = storage.read_versioned(uri)
        except FileNotFoundError:
            continue
        now = storage.now(folder) if now is None else now  # one probe for the whole listing
        lease = parse_lease(obj.data)
        out.append((uri, obj, lease, is_stale(lease, now - obj.modified, ttl_s)))
    return out


def live_readers(storage: st.Storage, work_dir: str, stage_dir: str, ignore: Optional[str] = None,
                 ttl_s: Optional[float] = None) -> list[dict[str, Any]]:
    """The live reader leases (other than ``ignore``, a lease id) that name ``stage_dir``."""
    return [lease for uri, _, lease, stale in reader_leases(storage, work_dir, ttl_s)
            if not stale and stage_dir in lease.get("stage_dirs", []) and not (ignore and uri.endswith(f"/{ignore}.json"))]


def live_lock(storage: st.Storage, stage_dir: str, ttl_s: Optional[float] = None) -> Optional[dict[str, Any]]:
    """The holder of the stage folder's lock, when it is held and not stale."""
    ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
    try:
        current = storage.read_versioned(st.join(stage_dir, LOCK_FILE))
    except FileNotFoundError:
        return None
    holder = parse_lease(current.data)
    return None if is_stale(holder, storage.now(stage_dir) - current.modified, ttl_s) else holder
