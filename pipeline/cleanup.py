"""``lmpipe gc FILE...``: remove what the work dirs hold that the named pipelines no longer need.

Four kinds of leftovers, in the work dirs of the named pipeline files:

* a **stage output no named pipeline reaches**: a ``<stage>/<fingerprint>/`` folder whose
  fingerprint is not the current fingerprint of any stage of any named file (an old config, an
  old code digest). It goes whole.
* a **superseded attempt**: an ``attempt-*`` folder of an output a named pipeline reaches that
  its committed manifest does not name (an earlier commit kept for a reader, a crashed or
  fenced-off run). The committed attempt is never touched; an attempt a stage's own check
  refused stays while its output has no commit (its error told the user to inspect it).
* a **superseded work folder**: a folder a stage keeps beside its attempts that its committed
  output no longer uses (``Stage.superseded_folders``: train's earlier Ray Train runs, with their
  checkpoints).
* a **stale reader lease** (``_readers/<id>.json`` of a run that is gone).

Nothing a live lease protects is touched: an output whose stage lock is live (being computed)
is kept, and so is every attempt of an output that a live reader lease names. Removing takes
the output's stage lock first (so no run starts computing it meanwhile), looks at the readers
again, and removes the commit marker before the files, so that a run looking from then on sees
no output rather than a partial one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Optional

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.config import LoadedConfig
from pipeline.locks import LOCK_FILE, StageBusy, StageLock, describe, live_lock, reader_leases

log = logging.getLogger("lmpipe")

FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")  # manifest.digest: what a stage output folder is named
UNREACHED = "no named pipeline reaches it"
SUPERSEDED = "superseded attempt (not the committed one)"
SUPERSEDED_WORK = "superseded work folder (the committed output does not use it)"
STALE_READER = "reader lease of a run that is gone"


@dataclass(frozen=True)
class Removal:
    uri: str
    bytes: int
    reason: str
    work_dir: str
    stage_dir: Optional[str] = None  # the output folder whose lock guards it (None: a reader lease)
    stage: str = ""


@dataclass(frozen=True)
class Kept:
    uri: str
    reason: str


@dataclass
class GcPlan:
    remove: list[Removal]
    kept: list[Kept]
    storages: dict[str, st.Storage]  # work_dir -> its storage

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.remove)


def _reached(loaded: LoadedConfig) -> set[str]:
    from pipeline.runner import Runner

    runner = Runner(loaded, use_ray=False, track=False)
    return {mf.stage_uri(runner.work_dir, name, f.value) for name, f in runner.fingerprints().items()}


def _size(storage: st.Storage, uri: str) -> int:
    return sum(storage.size(f) for f in storage.find_files(uri)) if storage.exists(uri) else 0


def _is_output(storage: st.Storage, stage_dir: str) -> bool:
    """A folder lmpipe wrote as a stage output (anything else in a work dir is left alone)."""
    return (storage.exists(mf.manifest_uri(stage_dir)) or storage.exists(st.join(stage_dir, LOCK_FILE))
            or bool(mf.attempts(storage, stage_dir)))


def plan_gc(pipelines: list[LoadedConfig]) -> GcPlan:
    """What ``lmpipe gc`` would remove (and what it keeps because a live lease protects it)."""
    reached: dict[str, set[str]] = {}
    storages: dict[str, st.Storage] = {}
    for loaded in pipelines:
        work_dir = loaded.resolved.work_dir
        storages.setdefault(work_dir, loaded.storage)
        reached.setdefault(work_dir, set()).update(_reached(loaded))
    remove: list[Removal] = []
    kept: list[Kept] = []
    for work_dir, storage in storages.items():
        readers = reader_leases(storage, work_dir)
        read = {d: lease for _, _, lease, stale in readers if not stale for d in lease.get("stage_dirs", [])}
        remove += [Removal(uri, len(obj.data), STALE_READER, work_dir) for uri, obj, _, stale in readers if stale]
        for stage in storage.ls_dirs(work_dir):
            if stage.startswith(("_", ".")):
                continue
            for fp in storage.ls_dirs(st.join(work_dir, stage)):
                stage_dir = mf.stage_uri(work_dir, stage, fp)
                if not FINGERPRINT.match(fp) or not _is_output(storage, stage_dir):
                    continue
                if stage_dir not in reached[work_dir]:
                    candidates = [Removal(stage_dir, _size(storage, stage_dir), UNREACHED, work_dir, stage_dir, stage)]
                else:
                    candidates = []
                    committed = mf.load_manifest(storage, stage_dir)
                    for attempt in mf.attempts(storage, stage_dir):
                        uri = st.join(stage_dir, attempt)
                        if committed is not None and attempt == committed["attempt"]:
                            continue
                        if committed is None and storage.exists(st.join(uri, mf.FAILED_MARKER)):
                            kept.append(Kept(uri, "refused by the stage's own check; kept to inspect until the stage commits"))
                            continue
                        candidates.append(Removal(uri, _size(storage, uri), SUPERSEDED, work_dir, stage_dir, stage))
                    for folder in _superseded_folders(storage, stage_dir):
                        uri = st.join(stage_dir, folder)
                        candidates.append(Removal(uri, _size(storage, uri), SUPERSEDED_WORK, work_dir, stage_dir, stage))
                if not candidates:
                    continue
                holder = live_lock(storage, stage_dir)
                if holder is not None:
                    kept += [Kept(c.uri, f"being computed by {describe(holder)}") for c in candidates]
                elif stage_dir in read:
                    kept += [Kept(c.uri, f"read by a running pipeline: {describe(read[stage_dir])}") for c in candidates]
                else:
                    remove += candidates
    return GcPlan(remove, kept, storages)


def apply_gc(plan: GcPlan) -> tuple[list[Removal], list[Kept]]:
    """Remove what ``plan`` lists, each output under its stage lock; returns what was removed
    and what was kept after all (a run took its lock or started reading it since the plan)."""
    done: list[Removal] = []
    kept: list[Kept] = []
    for removal in plan.remove:
        storage = plan.storages[removal.work_dir]
        if removal.stage_dir is None:  # a stale reader lease: only the version judged stale
            try:
                storage.delete_if(removal.uri, storage.read_versioned(removal.uri).version)
                done.append(removal)
            except (FileNotFoundError, st.PreconditionFailed):
                kept.append(Kept(removal.uri, "renewed since (its run is alive)"))
            continue
        lock = StageLock(storage, removal.stage_dir, removal.stage, run="lmpipe gc")
        try:
            lock.acquire()
        except StageBusy as e:
            kept.append(Kept(removal.uri, str(e)))
            continue
        try:
            readers = [lease for _, _, lease, stale in reader_leases(storage, removal.work_dir)
                       if not stale and removal.stage_dir in lease.get("stage_dirs", [])]
            if readers:
                kept.append(Kept(removal.uri, f"read by a running pipeline: {describe(readers[0])}"))
                continue
            lock.renew()
            if removal.reason == UNREACHED:
                _remove_output(storage, removal.stage_dir)
            elif removal.reason == SUPERSEDED_WORK:
                if removal.uri.rstrip("/").rsplit("/", 1)[-1] not in _superseded_folders(storage, removal.stage_dir):
                    kept.append(Kept(removal.uri, "used by an output committed since the plan"))
                    continue
                storage.rm(removal.uri)
            else:
                committed = mf.load_manifest(storage, removal.stage_dir)
                if committed is not None and removal.uri == st.join(removal.stage_dir, committed["attempt"]):
                    kept.append(Kept(removal.uri, "committed since the plan"))
                    continue
                storage.rm(removal.uri)
            done.append(removal)
        finally:
            lock.release()
            if removal.reason == UNREACHED and not st.is_remote(removal.stage_dir):
                _remove_empty_folder(removal.stage_dir)
    return done, kept


def _superseded_folders(storage: st.Storage, stage_dir: str) -> list[str]:
    """The committed stage's own folders that its output no longer uses (Stage.superseded_folders:
    train's earlier Ray Train runs); none without a commit (a run may be continuing them)."""
    committed = mf.load_committed(storage, stage_dir)
    if committed is None:
        return []
    from pipeline.registry import get_stage_class

    try:
        cls = get_stage_class(committed.uses)
    except Exception:  # a stage this lmpipe does not know: leave its folders alone
        return []
    return cls.superseded_folders(committed, storage.ls_dirs(stage_dir))


def _remove_output(storage: st.Storage, stage_dir: str) -> None:
    """The commit marker first (the output is gone for every reader from then on), then the
    attempts and the other files, all but the lock this process holds."""
    storage.rm(mf.manifest_uri(stage_dir))
    for attempt in mf.attempts(storage, stage_dir):
        storage.rm(st.join(stage_dir, attempt))
    for uri in storage.find_files(stage_dir):
        name = uri.rsplit("/", 1)[-1]
        if name not in (LOCK_FILE, st.CAS_FILE):
            storage.rm(uri)


def _remove_empty_folder(stage_dir: str) -> None:
    """A local output folder that only its CAS file is left in: moved aside first, so a run that
    creates the folder again gets a new one (and a new CAS file)."""
    try:
        left = set(os.listdir(stage_dir))
    except FileNotFoundError:
        return
    if left - {st.CAS_FILE}:
        return
    aside = f"{stage_dir}.gc-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(stage_dir, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"

