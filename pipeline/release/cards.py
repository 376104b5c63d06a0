"""The cards of a release, rendered from its records (:mod:`pipeline.release.records`) and nothing
else: a data card (sources, removals per stage and reason, dedup, contamination, tokens), a
model card and a dataset card in the Hugging Face layout (``README.md`` with YAML metadata).
Every function is pure and every collection is sorted or in pipeline order, so the same records
give the same bytes."""

from __future__ import annotations

import math
from typing import Any, Optional

import yaml

from pipeline import funnel
from pipeline.release.records import ReleaseRecords


def _front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=True, allow_unicode=True, default_flow_style=False, width=1000) + "---\n"


def _table(header: list[str], rows: list[list[Any]], right: int = 0) -> str:
    """A Markdown table; the last ``right`` columns right-aligned."""
    align = ["---"] * (len(header) - right) + ["---:"] * right
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def source_licences(records: ReleaseRecords) -> list[str]:
    return sorted({s.license for s in records.sources if s.license})


def dataset_license(records: ReleaseRecords) -> str:
    declared = records.loaded.declared.release.dataset_license
    if declared:
        return declared
    licences = source_licences(records)
    unlicensed = any(s.license is None for s in records.sources)
    return licences[0] if len(licences) == 1 and not unlicensed else ("unknown" if not licences else "other")


# -- the data card -----------------------------------------------------------------------------

def data_card(records: ReleaseRecords) -> str:
    name = records.loaded.declared.name
    out = [f"# Data card: {name}\n",
           "Rendered by `lmpipe release` from the pipeline's committed records (each stage's manifest and summary,"
           " in `records/`); nothing in it is written by hand.\n",
           "## Sources\n", _sources_table(records),
           "Digest: of the files' recorded identities (`content`: each file's sha256; `stat`: sizes and modification"
           " times or ETags), as MLflow's input datasets name them; each file is listed in `records/`.\n",
           "## Stages\n", _stages_table(records),
           "## Removed per stage and reason\n",
           "Documents and characters each stage kept and removed, per reason (quarantined: input that could not be read).\n",
           funnel.to_markdown(funnel.funnel_rows([s.manifest for s in records.stages])) or "No document stages.\n"]
    out += _dedup_sections(records) + _contamination_sections(records) + _token_sections(records)
    return "\n".join(out)


def _sources_table(records: ReleaseRecords) -> str:
    rows = [[s.name, s.license or "unspecified (set release.sources in the pipeline file)", s.homepage, s.uri, len(s.files), s.bytes,
             s.identity, s.digest] for s in records.sources]
    return _table(["source", "licence", "homepage", "location", "files", "bytes", "identity", "digest"], rows) if rows else "No source stages.\n"


def _stages_table(records: ReleaseRecords) -> str:
    rows = [[s.name, s.uses, s.manifest["version"], s.manifest["fingerprint"], s.manifest.get("code_version", "unknown"),
             s.manifest["counts"]["rows_in"], s.manifest["counts"]["kept"], s.manifest.get("counts_unit", "documents")]
            for s in records.stages]
    return _table(["stage", "uses", "version", "fingerprint", "code", "in", "kept", "unit"], rows, right=3)


def _dedup_sections(records: ReleaseRecords) -> list[str]:
    out = []
    for s in records.of_kind("dedup"):
        d = s.summary()
        out.append(f"## Deduplication: `{s.name}`\n")
        out.append(f"{d['removed']:,} documents removed; {d['components']:,} groups of near or exact duplicates holding"
                   f" {d['members']:,} documents ({d['verified_edges']:,} of {d['edges']:,} candidate pairs confirmed).\n")
        per_source = sorted(d["documents_per_source"])
        out.append(_table(["source", "documents in", "removed"],
                          [[src, d["documents_per_source"][src], d["removed_per_source"].get(src, 0)] for src in per_source], right=2))
        sizes = sorted(d["component_sizes"].items(), key=lambda kv: int(kv[0]))
        if sizes:
            out.append(_table(["group size", "groups"], [[int(k), v] for k, v in sizes], right=2))
    return out


def _contamination_sections(records: ReleaseRecords) -> list[str]:
    out = []
    for s in records.of_kind("decontaminate"):
        d = s.summary()
        out.append(f"## Contamination: `{s.name}` ({s.manifest['config'].get('mode', '')})\n")
        rows = [[task, t["examples"], t["examples_found"], f"{100 * t['fraction_found']:.2f}%", t["docs"], t["chars"],
                 t["docs_rejected"], t["docs_redacted"], ", ".join(f"{k}: {v}" for k, v in sorted(t["sources"].items())) or "—"]
                for task, t in sorted(d["tasks"].items())]
        out.append(_table(["task", "examples", "found in the corpus", "fraction", "documents", "characters", "rejected",
                           "redacted", "per source"], rows))
    return out


def _token_sections(records: ReleaseRecords) -> list[str]:
    out = []
    for s in records.of_kind("tokenize"):
        d = s.summary()
        out.append(f"## Tokens: `{s.name}` (sequences of {d['seq_len']} tokens, vocabulary {d['vocab_size']:,})\n")
        rows = []
        for split in sorted(d["tokens"] or d["tokens_encoded"]):
            for src in sorted(set(d["tokens_encoded"].get(split, {})) | set(d["tokens"].get(split, {}))):
                rows.append([split, src, d["documents"].get(split, {}).get(src), d["tokens_encoded"].get(split, {}).get(src),
                             d["tokens"].get(split, {}).get(src)])
        out.append(_table(["split", "source", "documents", "tokens encoded", "tokens after mixing"], rows, right=3))
        seqs = [[split, d["sequences"][split], d["tokens_in_sequences"].get(split)] for split in sorted(d["sequences"])]
        if seqs:
            out.append(_table(["split", "sequences", "tokens in sequences"], seqs, right=2))
        mix = d.get("mixture")
        if mix:
            sources = sorted(set(mix["rates"]) | set(mix["achieved_shares"]))
            out.append("Mixture (weights as configured; rate: copies per document):\n")
            out.append(_table(["source", "weight", "target share", "achieved share", "rate"],
                              [[src, (mix["weights"] or {}).get(src), (mix["target_shares"] or {}).get(src),
                                mix["achieved_shares"].get(src), mix["rates"].get(src)] for src in sources], right=4))
    return out


# -- the dataset card --------------------------------------------------------------------------

def dataset_card(records: ReleaseRecords) -> str:
    name = records.loaded.declared.name
    meta = {"license": dataset_license(records), "pretty_name": f"{name} training data", "tags": ["lmpipe"]}
    out = [_front_matter(meta), f"# {name}: training data\n",
           f"The corpus the pipeline `{name}` curated and tokenized; how each document was kept or removed, deduplicated and"
           " checked for contamination is in the data card (`../data_card.md`), rendered from the same records.\n",
           "## Sources\n", _sources_table(records)]
    out += _token_sections(records)
    return "\n".join(out)


# -- the model card ----------------------------------------------------------------------------

def final_results(records: ReleaseRecords) -> dict[str, list[dict[str, Any]]]:
    """Per evaluate stage, its rows of the final checkpoint (finite values), sorted by task and metric."""
    out = {}
    for stage, rows in sorted(records.evaluations.items()):
        summary = next(s for s in records.stages if s.name == stage).summary()
        final = {c["path"] for c in summary["checkpoints"] if c["final"]}
        picked = [r for r in rows if r["checkpoint"] in final and r["value"] is not None and math.isfinite(r["value"])]
        out[stage] = sorted(picked, key=lambda r: (r["task"], r["metric"]))
    return out


def model_index(name: str, results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Hugging Face's ``model-index``: one result per evaluated task, its metrics at the final checkpoint."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for rows in results.values():
        for r in rows:
            by_task.setdefault(r["task"], []).append(r)
    entries = []
    for task, rows in sorted(by_task.items()):
        metrics = [{"name": r["metric"], "type": r["metric"], "value": float(r["value"])} for r in rows]
        entries.append({"task": {"type": "text-generation", "name": "Text Generation"},
                        "dataset": {"name": task, "type": task}, "metrics": metrics})
    return [{"name": name, "results": entries}] if entries else []


def model_card(records: ReleaseRecords, export_config: dict[str, Any], training_log_file: Optional[str]) -> str:
    declared = records.loaded.declared
    train = records.train
    assert train is not None
    t = train.summary()
    results = final_results(records)
    meta: dict[str, Any] = {"license": declared.release.license or "unknown", "library_name": "transformers",
                            "pipeline_tag": "text-generation", "tags": ["lmpipe"],
                            "datasets": sorted({s.name for s in records.sources})}
    if declared.release.base_model:
        meta["base_model"] = declared.release.base_model
    index = model_index(declared.name, results)
    if index:
        meta["model-index"] = index
    arch = ", ".join(export_config.get("architectures") or []) or "unknown"
    out = [_front_matter(meta), f"# {declared.name}\n",
           f"A `{arch}` language model trained {'from `' + declared.release.base_model + '`' if declared.release.base_model else 'from scratch'}"
           f" by the pipeline `{declared.name}` (stage `{train.name}`,"
           f" fingerprint `{train.manifest['fingerprint']}`). This card is rendered by `lmpipe release` from the pipeline's"
           " records; the pipeline file and the code version that produced it are in `../pipeline/` and"
           " `../code_version.json`.\n",
           "## Training\n",
           _table(["training", "value"], [["steps", t["steps"]], ["tokens seen", t["tokens_seen"]], ["parameters", t.get("num_params")],
                             ["workers", t.get("world_size")], ["final training loss", t.get("final_loss")],
                             ["final validation loss", t.get("final_val_loss")], ["skipped steps", len(t.get("skipped_steps") or [])]]),
           "Model shape:\n", _table(["field", "value"], [[k, v] for k, v in sorted((t.get("model") or {}).items())])]
    if training_log_file:
        out.append(f"Every metric the training run logged, at every step: `../{training_log_file}` (exported from MLflow"
                   f" run `{records.training_log.run_id if records.training_log else ''}`).\n")
    out.append("## Training data\n")
    out.append("Sources (details, removals per stage and reason, deduplication, contamination and token counts: `../data_card.md`):\n")
    out.append(_sources_table(records))
    if results:
        from pipeline.registry import get_stage_class

        out.append("## Evaluation\n")
        uses = {s.name: s.uses for s in records.stages}
        for stage, rows in sorted(records.evaluations.items()):
            out.append(f"`{stage}`, every checkpoint (the final one is the model in this folder):\n")
            out.append(get_stage_class(uses[stage]).render_table(rows, "markdown"))
    if records.comparison is not None:
        out.append("## Ablations\n")
        out.append("The pipeline file's variants against the base and its seed noise (`../ablation/`):\n")
        out.append(records.comparison.comparison.markdown)
    return "\n".join(out)
