"""Keep/drop agreement between lmpipe's quality rules and datatrove's, on the same real documents
with the same thresholds (run: ``python bench/filters_agreement.py``; needs the ``bench`` extra).

For each rule family (Gopher quality, Gopher repetition, C4, FineWeb) both implementations run
standalone on the original documents; the chain runs them in FineWeb's order (repetition,
quality, C4, FineWeb) where C4's line removal feeds FineWeb. Every disagreement is written to
``bench/results/filters_disagreements.jsonl`` with both sides' reasons so it can be classified.
datatrove's decisions are cached (they take minutes: spaCy tokenisation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from filters_bench import corpora  # noqa: E402

RESULTS = REPO / "bench" / "results"
FAMILIES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


def datatrove_filters() -> dict:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return {
        "gopher_repetition": GopherRepetitionFilter,
        "gopher_quality": GopherQualityFilter,
        "c4": C4QualityFilter,
        "fineweb": FineWebQualityFilter,
    }


def run_datatrove(docs: dict[str, list[str]]) -> dict:
    """{corpus: {family|chain: [reason or None]}} plus seconds per family."""
    from datatrove.data import Document
    from loguru import logger

    logger.remove()
    classes = datatrove_filters()
    out: dict = {"decisions": {}, "seconds": {}}
    for corpus, texts in docs.items():
        dec: dict = {}
        for fam, cls in classes.items():
            f = cls()
            t0 = time.perf_counter()
            res = []
            for i, text in enumerate(texts):
                r = f.filter(Document(text=text, id=str(i)))
                res.append(None if r is True else (r[1] if isinstance(r, tuple) else "dropped"))
            out["seconds"].setdefault(fam, {})[corpus] = time.perf_counter() - t0
            dec[fam] = res
        chain = [cls() for cls in classes.values()]
        res = []
        for i, text in enumerate(texts):
            doc = Document(text=text, id=str(i))
            reason = None
            for fam, f in zip(classes, chain):
                r = f.filter(doc)
                if r is not True:
                    reason = f"{fam}:{r[1] if isinstance(r, tuple) else 'dropped'}"
                    break
            res.append(reason)
        dec["chain"] = res
        out["decisions"][corpus] = dec
        print(f"datatrove {corpus}: done", flush=True)
    return out


def cached_datatrove(docs: dict[str, list[str]], refresh: bool = False) -> dict:
    import datatrove

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"datatrove-{datatrove.__version__ if hasattr(datatrove, '__version__') else 'x'}-decisions.json"
    if path.exists() and not refresh:
        data = json.loads(path.read_text())
        if {c: len(v) for c, v in docs.items()} == data.get("sizes"):
            return data
    data = run_datatrove(docs)
    data["sizes"] = {c: len(v) for c, v in docs.items()}
    path.write_text(json.dumps(data))
    return data


def lmpipe_decisions(texts: list[str], family: str | None, batch: int = 2048) -> list:
    """lmpipe's reason per document through the quality_filter stage (a quarantine reason counts
    as a drop): one family alone (the others disabled), or all four (``family=None``)."""
    import pyarrow as pa

    from stages.filters import QualityFilter
    from stages.filters.quality import QualityConfig

    if family is None:
        cfg = QualityConfig()
    else:
        cfg = QualityConfig(**{f: {"enabled": f == family} for f in FAMILIES})
    stage = QualityFilter(cfg)
    out: list = []
    for i in range(0, len(texts), batch):
        res = stage.process_batch(pa.table({"text": pa.array(texts[i : i + batch], pa.string())}))
        drop, quarantine = res.column("drop_reason").to_pylist(), res.column("quarantine_reason").to_pylist()
        out.extend(d or (f"quarantine:{q}" if q else None) for d, q in zip(drop, quarantine))
    return out


def compare(docs: dict[str, list[str]], ref: dict) -> dict:
    report: dict = {}
    lines = []
    for corpus, texts in docs.items():
        for fam in (*FAMILIES, "chain"):
            mine = lmpipe_decisions(texts, None if fam == "chain" else fam)
            theirs = ref["decisions"][corpus][fam]
            agree = sum((a is None) == (b is None) for a, b in zip(mine, theirs))
            classes = Counter()
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if (a is None) != (b is None):
                    classes[(a, b)] += 1
                    lines.append(json.dumps({"corpus": corpus, "family": fam, "doc": i, "lmpipe": a, "datatrove": b}))
            report.setdefault(corpus, {})[fam] = {
                "docs": len(texts), "agree": agree, "agreement": round(agree / len(texts), 4),
                "lmpipe_dropped": sum(a is not None for a in mine), "datatrove_dropped": sum(b is not None for b in theirs),
                "disagreements": {f"lmpipe={a} / datatrove={b}": c for (a, b), c in classes.most_common()},
            }
    (RESULTS / "filters_disagreements.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datatrove-only", action="store_true", help="only compute and cache datatrove's decisions")
    ap.add_argument("--refresh", action="store_true", help="recompute datatrove's decisions")
    args = ap.parse_args()
    docs = corpora()
    ref = cached_datatrove(docs, args.refresh)
    if args.datatrove_only:
        return
    report = compare(docs, ref)
    total = sum(v["docs"] for c in report.values() for v in c.values())
    agree = sum(v["agree"] for c in report.values() for v in c.values())
    report["overall"] = {"decisions": total, "agree": agree, "agreement": round(agree / total, 4)}
    (RESULTS / "filters_agreement.json").write_text(json.dumps(report, indent=2))
    for corpus, fams in report.items():
        if corpus == "overall":
            continue
        for fam, r in fams.items():
            print(f"{corpus:12s} {fam:18s} {r['agree']:5d}/{r['docs']:<5d} = {r['agreement']:.4f}  dropped lmpipe {r['lmpipe_dropped']:5d} datatrove {r['datatrove_dropped']:5d}  {r['disagreements']}")
    print("overall", report["overall"])


if __name__ == "__main__":
    main()
