"""``lmpipe explain``: for each stage, whether ``lmpipe run`` would reuse its cached output and,
if not, exactly why -- by comparing what its fingerprint is computed from now with what the
last committed output of that stage recorded (``fingerprint_payload`` and ``code_files`` in
its manifest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline import manifest as mf
from pipeline.tracking import flatten

MAX_LISTED = 5
# What each code digest scope (pipeline.code_digest.DIGEST_SCOPE) changed, for the one-time recompute it causes.
SCOPE_CHANGES = {
    2: "the digest covers the modules the stage imports and the framework modules that write its bytes,"
       " and its libraries' versions enter the fingerprint",
}


@dataclass
class Explanation:
    stage: str
    fingerprint: str
    status: str  # "cached" | "will run" | "never built"
    stage_dir: str
    reasons: list[str] = field(default_factory=list)
    previous: Optional[dict[str, Any]] = None  # {"fingerprint", "started_at", "stage_dir"} of the output compared with
    sources: list[str] = field(default_factory=list)  # how each external input's files are identified ("news: by content (sha256)")

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "fingerprint": self.fingerprint, "status": self.status, "stage_dir": self.stage_dir,
                "reasons": self.reasons, "previous": self.previous, "sources": self.sources}


def _short(value: Any, limit: int = 60) -> str:
    text = "(absent)" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listed(items: list[str]) -> str:
    more = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old, "config"), flatten(new, "config")
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    return out


def _code_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    changed = sorted(f for f in set(old) & set(new) if old[f] != new[f])
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    out = []
    if changed:
        out.append(f"code changed: {_listed(changed)}")
    if added:
        out.append(f"code added: {_listed(added)}")
    if removed:
        out.append(f"code removed: {_listed(removed)}")
    return out


def _library_changes(old: Optional[dict[str, Optional[str]]], new: dict[str, Optional[str]]) -> list[str]:
    """``library pyarrow 25.0.1 -> 26.0.0``; an output from before library versions were part of
    the fingerprint (``old`` None) names the versions it is now pinned to."""
    if old is None:
        return [f"library versions now part of the fingerprint: {_listed([f'{k} {_version(v)}' for k, v in sorted(new.items())])}"] if new else []
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(f"library {name} added ({_version(new[name])})")
        elif name not in new:
            out.append(f"library {name} removed (was {_version(old[name])})")
        elif old[name] != new[name]:
            out.append(f"library {name} {_version(old[name])} -> {_version(new[name])}")
    return out


def _version(v: Optional[str]) -> str:
    return "(not installed)" if v is None else v


def _file_key(f: dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in f.items()))


# How an external input's files are identified (the ``identity`` of its payload entry; absent: stat).
IDENTITY_RULES = {"stat": "by size and mtime/ETag", "content": "by content (sha256)"}


def identity_rule(entry: dict[str, Any]) -> str:
    return IDENTITY_RULES.get(entry.get("identity", "stat"), str(entry.get("identity")))


def _external_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    a = {e["name"]: e for e in old}
    b = {e["name"]: e for e in new}
    out = []
    for name in sorted(set(a) | set(b)):
        if name not in a:
            out.append(f"external input {name} added")
        elif name not in b:
            out.append(f"external input {name} removed")
        elif a[name] != b[name]:
            rule_a, rule_b = identity_rule(a[name]), identity_rule(b[name])
            if rule_a != rule_b:
                out.append(f"external input {name}: files now identified {rule_b} (were {rule_a})")
                continue
            old_files = {f.get("uri", str(i)): _file_key(f) for i, f in enumerate(a[name]["files"])}
            new_files = {f.get("uri", str(i)): _file_key(f) for i, f in enumerate(b[name]["files"])}
            differ = sorted(u for u in set(old_files) | set(new_files) if old_files.get(u) != new_files.get(u))
            out.append(f"external input {name}: {len(differ)} file(s) added, removed or modified, files identified {rule_b}:"
                       f" {_listed(differ)}")
    return out


def differences(old_payload: dict[str, Any], new_payload: dict[str, Any], old_code: dict[str, str], new_code: dict[str, str]) -> list[str]:
    """Why two fingerprint payloads differ, one reason per line, most fundamental first."""
    reasons: list[str] = []
    if old_payload.get("uses") != new_payload.get("uses"):
        reasons.append(f"stage type changed: {old_payload.get('uses')} -> {new_payload.get('uses')}")
    if old_payload.get("version") != new_payload.get("version"):
        reasons.append(f"version changed: {old_payload.get('version')} -> {new_payload.get('version')}")
    old_scope, new_scope = old_payload.get("code_scope", 1), new_payload.get("code_scope", 1)
    if old_scope != new_scope:
        reasons.append(f"code digest scope changed: {old_scope} -> {new_scope} ({SCOPE_CHANGES.get(new_scope, 'what the digest covers')})")
    if old_payload.get("code") != new_payload.get("code"):
        reasons += _code_changes(old_code, new_code) or [f"code digest changed: {old_payload.get('code')} -> {new_payload.get('code')}"]
    reasons += _library_changes(old_payload.get("libraries"), new_payload.get("libraries", {}))
    reasons += _config_changes(old_payload.get("config", {}), new_payload.get("config", {}))
    old_inputs = {ref: fp for ref, fp in old_payload.get("inputs", [])}
    new_inputs = {ref: fp for ref, fp in new_payload.get("inputs", [])}
    for ref in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(ref) != new_inputs.get(ref):
            if ref not in old_inputs:
                reasons.append(f"input {ref} added")
            elif ref not in new_inputs:
                reasons.append(f"input {ref} removed")
            else:
                reasons.append(f"input {ref} changed: {old_inputs[ref]} -> {new_inputs[ref]}")
    old_extras, new_extras = dict(old_payload.get("extras", {})), dict(new_payload.get("extras", {}))
    reasons += _external_changes(old_extras.pop("external_inputs", []), new_extras.pop("external_inputs", []))
    for key in sorted(set(old_extras) | set(new_extras)):
        if old_extras.get(key) != new_extras.get(key):
            reasons.append(f"{key} changed: {_short(old_extras.get(key))} -> {_short(new_extras.get(key))}")
    if old_payload.get("seed") != new_payload.get("seed"):
        reasons.append(f"seed changed: {old_payload.get('seed')} -> {new_payload.get('seed')}")
    return reasons or ["the fingerprint differs but its recorded inputs do not (a manifest edited by hand?)"]


def explain(runner, only: Optional[str] = None) -> list[Explanation]:
    """What ``runner.run()`` would do, stage by stage (``only``: that stage and its upstream)."""
    from pipeline.dag import upstream_of

    computed = runner.fingerprints()
    names = [n.name for n in runner.order]
    if only is not None:
        names = upstream_of(runner.order, only) + [only]
    storage, work_dir = runner.storage, runner.work_dir
    pipeline_name = runner.loaded.declared.name
    out = []
    for name in names:
        fp = computed[name]
        stage_dir = mf.stage_uri(work_dir, name, fp.value)
        try:
            committed = mf.read_manifest(storage, stage_dir)
        except (mf.ManifestUnreadable, mf.ManifestInvalid) as e:
            out.append(Explanation(name, fp.value, "will run", stage_dir, [f"{e} -- treated as not committed"]))
            continue
        if committed is not None:
            out.append(Explanation(name, fp.value, "cached", stage_dir, sources=_source_rules(fp.payload)))
            continue
        history = mf.stage_manifests(storage, work_dir, name)
        ours = [m for m in history if m.get("pipeline") == pipeline_name] or history
        if not ours:
            out.append(Explanation(name, fp.value, "never built", stage_dir, ["no committed output of this stage in the work dir"]))
            continue
        last = ours[0]
        previous = {"fingerprint": last["fingerprint"], "started_at": last.get("timings", {}).get("started_at"),
                    "stage_dir": mf.stage_uri(work_dir, name, last["fingerprint"])}
        if "fingerprint_payload" not in last:
            reasons = ["the last output was written by an lmpipe that did not record its fingerprint's inputs"]
        else:
            reasons = differences(last["fingerprint_payload"], fp.payload, last.get("code_files", {}), fp.code_files)
        out.append(Explanation(name, fp.value, "will run", stage_dir, reasons, previous, _source_rules(fp.payload)))
    return out


def _source_rules(payload: dict[str, Any]) -> list[str]:
    """``news: by content (sha256)`` for each external input: the rule that says whether it changed."""
    return [f"{e['name']}: {identity_rule(e)}" for e in payload.get("extras", {}).get("external_inputs", [])]


def format_explanations(items: list[Explanation]) -> str:
    width = max((len(e.stage) for e in items), default=5)
    lines = []
    for e in items:
        head = f"{e.stage:<{width}}  {e.status:<11}  {e.fingerprint}"
        # the default rule (size and mtime/ETag) goes unsaid on a cached stage; a rerun's reason names it
        sources = f"{'':<{width}}    source files identified: {'; '.join(e.sources)}" if any("content" in s for s in e.sources) else None
        if e.status == "cached":
            lines.append(f"{head}  {e.stage_dir}")
            lines += [sources] if sources else []
            continue
        if e.previous:
            head += f"  (last built: {e.previous['fingerprint']} at {e.previous['started_at']})"
        lines.append(head)
        lines += [f"{'':<{width}}    - {r}" for r in e.reasons]
    return "\n".join(lines)
