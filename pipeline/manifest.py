"""Fingerprints, stage folders and the commit marker (``_manifest.json``).

Layout of one stage output::

    <work_dir>/<stage>/<fingerprint>/
        attempt-<uuid>/data/part-00000-0000.parquet   # written by one attempt
        attempt-<uuid>/rejected/...
        attempt-<uuid>/_lease.json                    # the run that writes it (its lock token, host, pid)
        _manifest.json                                # written last, atomically: the commit

Readers only read files that a manifest lists, so an attempt that crashed (no manifest, or a
manifest naming another attempt) is invisible; it is deleted by the next attempt once its run is
known to be gone, else by the next commit (see :mod:`pipeline.locks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Optional

from pydantic import ValidationError

from pipeline import storage as st
from pipeline.contracts import Manifest, describe_error

log = logging.getLogger("lmpipe")

MANIFEST = "_manifest.json"
MANIFEST_FORMAT = 2  # 2: fingerprints include the stage's code digest (fingerprint_payload)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint_payload(
    uses: str,
    version: str,
    config: dict[str, Any],
    inputs: list[tuple[str, str]],
    extras: dict[str, Any],
    seed: Optional[int],
    code: str,
    code_scope: int,
    libraries: dict[str, Optional[str]],
) -> dict[str, Any]:
    """Everything a stage's output depends on. Stored in the manifest, so that ``lmpipe explain``
    can say which part changed when a stage has to run again. ``code_scope``: what the code digest
    covers (:data:`pipeline.code_digest.DIGEST_SCOPE`); ``libraries``: the installed versions of
    the libraries that decide the stage's bytes."""
    return {
        "uses": uses,
        "version": version,
        "code": code,
        "code_scope": code_scope,
        "libraries": dict(sorted(libraries.items())),
        "config": config,
        "inputs": [list(i) for i in sorted(inputs)],  # lists, as the manifest's JSON reads back
        "extras": extras,
        "seed": seed,
    }


def digest(obj: Any) -> str:
    """A short content digest of any JSON-able value: a stage's fingerprint (of its
    fingerprint_payload), an external input's file list."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def stage_uri(work_dir: str, stage: str, fp: str) -> str:
    return st.join(work_dir, stage, fp)


def manifest_uri(stage_dir: str) -> str:
    return st.join(stage_dir, MANIFEST)


def stage_manifests(storage: st.Storage, work_dir: str, stage: str) -> list[dict[str, Any]]:
    """Every committed manifest of a stage name under ``work_dir``, newest first."""
    found = []
    for fp in storage.ls_dirs(st.join(work_dir, stage)):
        m = load_manifest(storage, st.join(work_dir, stage, fp))
        if m is not None:
            found.append(m)
    return sorted(found, key=lambda m: m.get("timings", {}).get("started_at", ""), reverse=True)


# Keys that stages once spread over the manifest's own (their content now lives in ``summary``);
# a manifest committed before that still reads, without them.
LEGACY_STAGE_KEYS = ("dedup", "decontaminate")


class ManifestInvalid(ValueError):
    """A committed manifest that does not match :class:`pipeline.contracts.Manifest`."""


class ManifestUnreadable(ValueError):
    """A ``_manifest.json`` that is not a JSON object (truncated, damaged, not UTF-8)."""


def read_manifest(storage: st.Storage, stage_dir: str) -> Optional[dict[str, Any]]:
    """The committed manifest of a stage folder, checked against the :class:`Manifest` contract
    (None: nothing committed, or a manifest of another format). A manifest that cannot be read
    raises :class:`ManifestUnreadable` or :class:`ManifestInvalid`, naming the file."""
    uri = manifest_uri(stage_dir)
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestUnreadable(f"{uri}: not a readable stage manifest ({len(data)} bytes): {e}") from None
    if not isinstance(manifest, dict):
        raise ManifestUnreadable(f"{uri}: not a readable stage manifest: a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != MANIFEST_FORMAT:
        return None
    return parse_manifest(manifest, uri)


_warned: set[str] = set()


def load_manifest(storage: st.Storage, stage_dir: str) -> Optional[dict[str, Any]]:
    """As :func:`read_manifest`, but a manifest that cannot be read is an output that is not
    committed (None, after one warning naming the file): the stage is computed again and its
    commit replaces the damaged file, so one bad file never blocks a run (``--force`` included)."""
    try:
        return read_manifest(storage, stage_dir)
    except (ManifestUnreadable, ManifestInvalid) as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            log.warning("%s -- treated as not committed: the stage is computed again", e)
        return None


def load_committed(storage: st.Storage, stage_dir: str) -> Optional[Manifest]:
    """The committed manifest of a stage folder as its contract (None: nothing committed, or a
    damaged manifest, as :func:`load_manifest` says)."""
    manifest = load_manifest(storage, stage_dir)
    return None if manifest is None else Manifest.model_validate(manifest)


def parse_manifest(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """``manifest`` validated as a :class:`Manifest`, as the JSON object readers index."""
    manifest = {k: v for k, v in manifest.items() if k not in LEGACY_STAGE_KEYS}
    try:
        return Manifest.model_validate(manifest).to_json()
    except ValidationError as e:
        raise ManifestInvalid(f"{where}: not a valid stage manifest: {describe_error(e)}") from None


def dataset_files(manifest: dict[str, Any] | Manifest, stage_dir: str, dataset: str = "data") -> list[str]:
    if isinstance(manifest, Manifest):
        manifest = manifest.to_json()
    info = manifest["datasets"].get(dataset)
    if info is None:
        raise KeyError(f"stage {manifest['stage']!r} has no dataset {dataset!r}")
    return [st.join(stage_dir, f["path"]) for f in info["files"]]


def dataset_uri(manifest: dict[str, Any], stage_dir: str, dataset: str = "data") -> str:
    return st.join(stage_dir, manifest["attempt"], dataset)


FAILED_MARKER = "_FAILED.json"
ATTEMPT_HOLDER = "_lease.json"  # in an attempt folder: the run writing it (its stage lock's token, host, pid)


def attempt_holder(storage: st.Storage, stage_dir: str, attempt: str) -> Optional[dict[str, Any]]:
    """Who wrote an attempt folder (None when it does not say: written before holders were recorded)."""
    try:
        holder = storage.read_json(st.join(stage_dir, attempt, ATTEMPT_HOLDER))
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def attempts(storage: st.Storage, stage_dir: str) -> list[str]:
    return [name for name in storage.ls_dirs(stage_dir) if name.startswith("attempt-")]


def remove_stale_attempts(storage: st.Storage, stage_dir: str, keep: Optional[str], keep_failed: bool = False,
                          removable: Optional[Callable[[str], bool]] = None) -> list[str]:
    """Delete attempt folders other than ``keep`` (crashed or superseded runs). ``keep_failed``:
    also keep attempts that a stage's own check refused (they hold what its error told the user
    to inspect, e.g. a quarantine dataset) until the stage next commits. ``removable(name)``:
    whether an attempt may go now (default: every one)."""
    removed = []
    for name in attempts(storage, stage_dir):
        if name == keep:
            continue
        if keep_failed and storage.exists(st.join(stage_dir, name, FAILED_MARKER)):
            continue
        if removable is not None and not removable(name):
            continue
        storage.rm(st.join(stage_dir, name))
        removed.append(name)
    return removed
