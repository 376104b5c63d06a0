"""Walk from any output back to the source files, through the committed manifests."""

from __future__ import annotations

from typing import Any

from pipeline import manifest as mf
from pipeline import storage as st


def find_stage_dir(storage: st.Storage, path: str) -> str:
    """The stage folder (holding ``_manifest.json``) for a stage folder, or any file/folder inside it."""
    cur = path.rstrip("/")
    for _ in range(6):
        if storage.exists(mf.manifest_uri(cur)):
            return cur
        parent = cur.rsplit("/", 1)[0] if "/" in cur else cur
        if parent == cur or parent.endswith(":/") or parent == "":
            break
        cur = parent
    raise FileNotFoundError(f"{path}: not inside a committed stage output (no {mf.MANIFEST} found above it)")


def stage_dir_from_run(tracking_uri: str, run_id: str) -> str:
    from pipeline.tracking import stage_output_of_run

    return stage_output_of_run(tracking_uri, run_id)


def lineage_tree(storage: st.Storage, stage_dir: str) -> dict[str, Any]:
    manifest = mf.read_manifest(storage, stage_dir)  # a damaged one is an error naming the file
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no committed manifest")
    node = {
        "stage": manifest["stage"],
        "uses": manifest["uses"],
        "version": manifest["version"],
        "fingerprint": manifest["fingerprint"],
        "stage_dir": stage_dir,
        "attempt": manifest["attempt"],
        "counts": manifest["counts"],
        "datasets": {k: {"rows": v["rows"], "files": len(v["files"])} for k, v in manifest["datasets"].items()},
        "sources": manifest.get("external_inputs", []),
        "inputs": [],
    }
    for inp in manifest.get("inputs", []):
        child = lineage_tree(storage, inp["stage_dir"])
        child["via"] = inp["dataset"]
        node["inputs"].append(child)
    return node


def format_tree(node: dict[str, Any], indent: str = "") -> str:
    c = node["counts"]
    rejected = sum(c["rejected"].values())
    quarantined = sum(c["quarantined"].values())
    lines = [
        f"{indent}{node['stage']}  ({node['uses']} v{node['version']}, fingerprint {node['fingerprint']})",
        f"{indent}  rows: {c['rows_in']} in -> {c['kept']} kept, {rejected} rejected, {quarantined} quarantined",
        f"{indent}  output: {st.join(node['stage_dir'], node['attempt'])}",
    ]
    for reason, n in list(c["rejected"].items()) + list(c["quarantined"].items()):
        lines.append(f"{indent}    {reason}: {n}")
    for src in node["sources"]:
        lines.append(f"{indent}  source {src['name']}: {src['uri']} ({len(src['files'])} files)")
        for f in src["files"][:20]:
            lines.append(f"{indent}    {f['uri']}  ({f.get('size', '?')} bytes)")
        if len(src["files"]) > 20:
            lines.append(f"{indent}    ... {len(src['files']) - 20} more")
    for child in node["inputs"]:
        lines.append(f"{indent}  <- reads {child['stage']}.{child['via']}")
        lines.append(format_tree(child, indent + "     "))
    return "\n".join(lines)
