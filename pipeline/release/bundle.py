"""A release bundle: what it holds (:func:`plan_bundle`), writing it (local or ``s3://``) with the
sha256 of every file in ``SHA256SUMS`` (``sha256sum -c`` reads it), and checking it back
(:func:`verify_bundle`).

Same records, same bytes: every file is rendered from the records with sorted keys and stable
ordering and carries no time of its own; the export's files are copied as they are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from pipeline import storage as st
from pipeline.release import cards
from pipeline.release.records import ReleaseRecords, ReleaseRefused

SUMS = "SHA256SUMS"
CHUNK = 8 << 20
MODEL_DIR = "model"  # the Hugging Face model folder: its card (README.md) and the export
_SUM_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative to the bundle, with "/"
    data: Optional[bytes] = None  # rendered content, or
    source: Optional[str] = None  # a file copied as it is (the export's weights: never held whole)


def plan_bundle(records: ReleaseRecords) -> list[BundleFile]:
    """Every file of the release, sorted by path."""
    loaded, storage = records.loaded, records.storage
    files = [BundleFile("data_card.md", cards.data_card(records).encode()),
             BundleFile("dataset/README.md", cards.dataset_card(records).encode()),
             BundleFile(f"pipeline/{os.path.basename(loaded.path)}", loaded.text.encode()),
             BundleFile("code_version.json", st.json_bytes(code_version(records)))]
    files += [BundleFile(f"records/{s.name}.manifest.json", st.json_bytes(s.manifest)) for s in records.stages]
    uses = {s.name: s.uses for s in records.stages}
    for stage, rows in sorted(records.evaluations.items()):
        from pipeline.registry import get_stage_class

        files.append(BundleFile(f"evaluation/{stage}.csv", get_stage_class(uses[stage]).render_table(rows, "csv").encode()))
    if records.comparison is not None:
        c = records.comparison.comparison
        files += [BundleFile("ablation/comparison.md", c.markdown.encode()), BundleFile("ablation/comparison.csv", c.csv.encode())]
        if c.png:
            files.append(BundleFile("ablation/validation_bpb.png", c.png))
    if records.train is not None:
        export = records.train.summary()["hf_export"]
        export_files = {_relative(export, uri): uri for uri in storage.find_files(export)}
        export_files.pop("README.md", None)  # the model card below is the folder's README
        if "config.json" not in export_files:
            raise ReleaseRefused(f"{export}: the Hugging Face export of stage {records.train.name!r} has no config.json")
        files += [BundleFile(f"{MODEL_DIR}/{rel}", source=uri) for rel, uri in sorted(export_files.items())]
        log_file = None
        if records.training_log is not None:
            log_file = f"training_logs/{records.training_log.stage}.csv"
            files.append(BundleFile(log_file, _metrics_csv(records).encode()))
        export_config = json.loads(storage.read_bytes(export_files["config.json"]))
        files.append(BundleFile(f"{MODEL_DIR}/README.md", cards.model_card(records, export_config, log_file).encode()))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise ReleaseRefused(f"two files of the release would be {sorted(p for p in paths if paths.count(p) > 1)[0]}")
    return sorted(files, key=lambda f: f.path)


def code_version(records: ReleaseRecords) -> dict[str, Any]:
    """The code that made the outputs, as their manifests recorded it (git commit, or the
    package version, per stage; code digests per module; library versions), and this lmpipe."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lmpipe = version("lmpipe")
    except PackageNotFoundError:
        lmpipe = "unknown"
    stages = {}
    for s in records.stages:
        m, payload = s.manifest, s.manifest.get("fingerprint_payload", {})
        stages[s.name] = {"uses": s.uses, "version": m["version"], "code_version": m.get("code_version", "unknown"),
                          "code_digest": payload.get("code"), "code_files": m.get("code_files", {}),
                          "libraries": payload.get("libraries", {})}
    return {"lmpipe_version": lmpipe, "code_versions": sorted({s["code_version"] for s in stages.values()}), "stages": stages}


def _metrics_csv(records: ReleaseRecords) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["metric", "step", "timestamp_ms", "value"])
    for p in records.training_log.points:
        writer.writerow([p.key, p.step, p.timestamp_ms, repr(p.value)])
    return buf.getvalue()


def _relative(folder: str, uri: str) -> str:
    return posixpath.relpath(uri, folder.rstrip("/")) if st.is_remote(folder) else os.path.relpath(uri, folder).replace(os.sep, "/")


# -- writing ------------------------------------------------------------------------------------

def write_bundle(storage: st.Storage, out: str, files: list[BundleFile]) -> dict[str, str]:
    """Write the files and, last, ``SHA256SUMS``; returns path -> sha256. Locally the bundle is
    written to a temporary folder beside ``out`` and renamed (a reader never sees half of one);
    on S3 each object is one PUT and ``SHA256SUMS`` comes last, so a bundle without it is
    unfinished. ``out`` must not hold files yet."""
    out = out.rstrip("/") if st.is_remote(out) else os.path.abspath(out)
    if storage.exists(out) and (not storage.isdir(out) or storage.find_files(out)):
        raise ReleaseRefused(f"{out}: already holds files; a release is written to a new folder")
    target = out if st.is_remote(out) else f"{out}.tmp-{uuid.uuid4().hex}"
    digests = {}
    try:
        for f in files:
            digests[f.path] = _write_file(storage, f, st.join(target, *f.path.split("/")))
        sums = "".join(f"{digests[p]}  {p}\n" for p in sorted(digests))
        storage.write_bytes_atomic(st.join(target, SUMS), sums.encode())
        if not st.is_remote(out):
            if os.path.isdir(out):
                os.rmdir(out)  # empty (checked above)
            os.rename(target, out)
    except BaseException:
        if not st.is_remote(out):
            storage.rm(target)
        raise
    return digests


def _write_file(storage: st.Storage, f: BundleFile, uri: str) -> str:
    if not st.is_remote(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
    if f.data is not None:
        storage.write_bytes_atomic(uri, f.data)
        return hashlib.sha256(f.data).hexdigest()
    h = hashlib.sha256()
    with storage.open(f.source, "rb") as src, storage.open(uri, "wb") as dst:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


# -- checking -----------------------------------------------------------------------------------

class BundleInvalid(ValueError):
    """A bundle whose files are not the ones its ``SHA256SUMS`` lists."""


def verify_bundle(storage: st.Storage, folder: str) -> int:
    """Check every file of a bundle against ``SHA256SUMS``; returns the number of files checked,
    or raises :class:`BundleInvalid` naming each file that changed, is missing or is not listed."""
    folder = folder.rstrip("/") if st.is_remote(folder) else os.path.abspath(folder)
    sums_uri = st.join(folder, SUMS)
    if not storage.exists(sums_uri):
        raise BundleInvalid(f"{folder}: no {SUMS}: not a release bundle, or one whose writing did not finish")
    listed: dict[str, str] = {}
    for n, line in enumerate(storage.read_bytes(sums_uri).decode("utf-8", "replace").splitlines(), 1):
        m = _SUM_LINE.match(line)
        if not m:
            raise BundleInvalid(f"{sums_uri}: line {n}: not '<sha256>  <path>': {line[:80]!r}")
        listed[m.group(2)] = m.group(1)
    present = {_relative(folder, uri) for uri in storage.find_files(folder)} - {SUMS}
    problems = []
    for path in sorted(listed.keys() | present):
        if path not in present:
            problems.append(f"{path}: missing")
        elif path not in listed:
            problems.append(f"{path}: not listed in {SUMS}")
        else:
            actual = _sha256(storage, st.join(folder, *path.split("/")))
            if actual != listed[path]:
                problems.append(f"{path}: changed (sha256 {actual[:12]}…, {SUMS} says {listed[path][:12]}…)")
    if problems:
        raise BundleInvalid(f"{folder}: does not verify: {'; '.join(problems)}")
    return len(listed)


def _sha256(storage: st.Storage, uri: str) -> str:
    h = hashlib.sha256()
    with storage.open(uri, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def make_release(loaded, out: str) -> dict[str, str]:
    """``lmpipe release FILE --out DIR``: the records gathered, rendered and written."""
    from pipeline.release.records import gather

    return write_bundle(loaded.storage, out, plan_bundle(gather(loaded)))
