"""Deduplication stages: ``exact_dedup`` (normalized-text and URL hashes) and ``minhash_dedup``
(MinHash LSH near-duplicates). Both keep every input row exactly once: kept rows go to ``data``,
duplicates to ``rejected`` with ``drop_reason``, ``duplicate_of`` (the kept document's id),
``dup_component`` and ``dup_component_size``. See :mod:`stages.dedup.engine` for how the work is
distributed and what bounds its memory.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Iterator, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipeline import storage as st
from pipeline.config import PerformanceField, StrictModel
from pipeline.registry import register
from pipeline.stage import PART_WRITERS, DatasetStage, Part, Resources
from stages.dedup import engine
from stages.dedup.lsh import band_keys, kind_key, optimal_param
from stages.dedup.minhash import MinHasher, ShingleConfig
from stages.dedup.normalize import NormalizeConfig, normalize, normalized_join
from stages.summaries.dedup import DedupSummary

EXACT_DUPLICATE = "exact_duplicate"
URL_DUPLICATE = "url_duplicate"
NEAR_DUPLICATE = "near_duplicate"
# An exchange step of the shuffle makes partitions x partitions blocks (object references on Ray):
# 256 is ~65 k per step; 2000 took 9.5 GB of driver memory.
MAX_PARTITIONS = 256


class KeepConfig(StrictModel):
    keep: Literal["source_priority", "longest"] = Field(
        default="source_priority",
        description="which document of a duplicate group is kept: best source then smallest id, or longest text",
    )
    source_priority: list[str] = Field(default_factory=list, description="preferred sources first; unlisted sources after")
    num_partitions: Optional[int] = PerformanceField(
        default=None, ge=1, le=MAX_PARTITIONS,
        description=f"shuffle partitions (default: ~2 M key rows each, at least one per CPU up to 32; at most {MAX_PARTITIONS},"
                    " and never more than there are key rows); outputs do not depend on it")
    batch_rows: int = Field(default=8192, ge=1, description="rows per batch when routing the output")
    keep_work: bool = PerformanceField(default=False, description="keep the intermediate files under <attempt>/_work (for debugging)")


class ExactDedupConfig(KeepConfig):
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    text: bool = Field(default=True, description="group documents with the same normalized text")
    urls: bool = Field(default=False, description="also group documents with the same (normalized) URL")

    @model_validator(mode="after")
    def _something(self):
        if not self.text and not self.urls:
            raise ValueError("at least one of text, urls must be true")
        return self


class MinhashDedupConfig(KeepConfig):
    shingle: ShingleConfig = Field(default_factory=ShingleConfig)
    num_perm: int = Field(default=128, ge=2, le=1024)
    seed: int = Field(default=1, ge=0, description="datasketch MinHash seed")
    threshold: float = Field(default=0.8, gt=0, lt=1, description="Jaccard threshold the LSH is tuned for")
    weights: tuple[float, float] = Field(
        default=(0.05, 0.95),
        description="false positive / false negative weights (sum 1) for choosing b x r like datasketch;"
        " (0.5, 0.5) is datasketch's default but finds only ~40% of pairs at exactly the threshold",
    )
    verify: Optional[float] = Field(
        default=0.05,
        ge=0,
        description="drop candidate pairs whose estimated Jaccard is below threshold - verify (null: no verification)",
    )
    bands: Optional[int] = Field(default=None, ge=1, description="b; with rows, overrides the optimum")
    rows: Optional[int] = Field(default=None, ge=1, description="r; with bands, overrides the optimum")

    @model_validator(mode="after")
    def _params(self):
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if abs(sum(self.weights) - 1.0) > 1e-9:
            raise ValueError("weights must sum to 1")
        return self

    def lsh_params(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        return optimal_param(self.threshold, self.num_perm, *self.weights)


# -- keys (run inside Ray workers; module-level so they pickle) -----------------------------------------

def _blake64(values: list[Optional[str]]) -> pa.Array:
    out = [None if not v else int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest(), "little") for v in values]
    return pa.array(out, pa.uint64())


def normalize_url(url: Optional[str]) -> Optional[str]:
    """Scheme and host lowercased, fragment and trailing slash dropped: http://A.com/x/#y == http://a.com/x"""
    if not url or not url.strip():
        return None
    url = url.strip().split("#", 1)[0]
    if "://" in url:
        scheme, rest = url.split("://", 1)
        host, sep, path = rest.partition("/")
        url = f"{scheme.lower()}://{host.lower()}{sep}{path}"
    return url.rstrip("/") or None


def _kinded(raw: pa.Array, kind: int) -> pa.Array:
    valid = pc.is_valid(raw).to_numpy(zero_copy_only=False)
    keys = kind_key(pc.fill_null(raw, 0).to_numpy(zero_copy_only=False), kind)
    return pa.array(keys.view(np.int64), pa.int64(), mask=~valid)


def exact_keys(config: ExactDedupConfig, batch: pa.Table) -> dict[str, pa.Array]:
    keys: dict[str, pa.Array] = {}
    joined = normalized_join(normalize(batch.column("text"), config.normalize))
    text_raw = _blake64(joined.to_pylist())
    keys["text_key"] = _kinded(text_raw, 0)  # kept even when text dedup is off: it names the reason
    if config.urls and "url" in batch.column_names:
        keys["url_key"] = _kinded(_blake64([normalize_url(u) for u in batch.column("url").to_pylist()]), 1)
    return keys


_HASHERS: dict[tuple[int, int], MinHasher] = {}


def minhash_keys(config: MinhashDedupConfig, b: int, r: int, batch: pa.Table) -> dict[str, pa.Array]:
    hasher = _HASHERS.get((config.num_perm, config.seed))
    if hasher is None:
        hasher = _HASHERS[(config.num_perm, config.seed)] = MinHasher(config.num_perm, config.seed)
    sigs, shingles = hasher.signatures_of_texts(batch.column("text"), config.shingle)
    keys = band_keys(sigs, b, r)
    empty = shingles == 0  # no shingle at all: never a candidate (would all share buckets)
    keys = keys.view(np.int64)  # same bits; see engine's note on uint64 in Ray Data
    out = {f"band_{i:03d}": pa.array(keys[:, i], pa.int64(), mask=empty) for i in range(b)}
    if config.verify is not None:
        out["signature"] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(4 * config.num_perm), len(sigs), [None, pa.py_buffer(np.ascontiguousarray(sigs).tobytes())]
        )
    return out


def exact_reason(removed: pa.Table, keepers: pa.Table) -> pa.Array:
    same_text = pc.fill_null(pc.equal(removed.column("text_key"), keepers.column("text_key")), False)
    return pc.if_else(same_text, EXACT_DUPLICATE, URL_DUPLICATE)


def near_reason(removed: pa.Table, keepers: pa.Table) -> pa.Array:
    return pa.array([NEAR_DUPLICATE] * removed.num_rows, pa.string())


# -- stages -------------------------------------------------------------------------------------

def default_partitions(key_rows: int, cpus: int) -> int:
    """~2 million key rows per partition (what one shuffle task holds at once), and at least one
    per CPU of the cluster (up to 32), so that every step of the shuffles keeps the cluster busy.
    The outputs do not depend on it."""
    return max(1, min(MAX_PARTITIONS, max(key_rows // 2_000_000 + 1, min(cpus, 32))))


def usable_partitions(configured: Optional[int], key_rows: int, cpus: int) -> int:
    """The configured partitions (else the default), never more than there are key rows: an
    exchange step holds partitions x partitions blocks, so 2000 partitions over 198 documents
    took 9.5 GB for nothing. The outputs do not depend on it."""
    return max(1, min(configured or default_partitions(key_rows, cpus), key_rows))


class _DedupStage(DatasetStage):
    outputs = ("data", "rejected")
    row_preserving = True
    requires = ("id", "text", "source")
    resources = Resources(num_cpus=1, batch_size=4096)
    writes_through = PART_WRITERS  # the duplicates are routed through ctx.run_parts
    # numba compiles the hashing kernels; scipy integrates the LSH band/row choice.
    libraries = ("pyarrow", "numpy", "numba", "scipy")
    Summary = DedupSummary

    def _keys(self, ctx) -> tuple[Any, list[str], tuple[str, ...], Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _columns(self) -> list[str]:
        return ["id", "text", "source"]

    def run(self, ctx) -> None:
        cfg = self.config
        work = st.join(ctx.attempt_uri, "_work")
        keys_fn, key_columns, extra, reason_fn = self._keys(ctx)
        rows = ctx.inputs[0].num_rows
        cpus = int(ctx.fan_out.cluster_resources().get("CPU", 1))
        partitions = usable_partitions(cfg.num_partitions, rows * len(key_columns), cpus)
        files = engine.build_nodes_and_keys(ctx, work, self._columns(), keys_fn, key_columns, partitions)
        verify = getattr(cfg, "verify", None)
        job = engine.ComponentJob(ctx.storage, work, cfg.keep, tuple(cfg.source_priority), extra,
                                  None if verify is None else cfg.threshold - verify)
        if files:
            stats = engine.components_and_removals(job, reason_fn, partitions, ctx.fan_out.exchange, ctx.stage_name)
        else:
            stats = {"partitions": partitions, "rounds": 0, "edges": 0, "verified_edges": 0, "members": 0, "components": 0, "removed": 0,
                     "removed_per_source": {}, "component_sizes": {}, "documents_per_source": {}}
        per_source = stats["documents_per_source"]
        removed_dir = st.join(work, "removed")
        parts = []
        for i, uri in enumerate(files):
            removed_uri = st.join(removed_dir, f"part-{i:05d}")
            parts.append(Part(f"{i:05d}", {"uri": uri, "removed": removed_uri if ctx.storage.exists(removed_uri) else None}))
        ctx.run_parts(parts)
        self._report(ctx, stats, per_source)
        if not cfg.keep_work:
            ctx.storage.rm(work)

    def process_part(self, part: Part, pctx) -> Iterator[pa.Table]:
        yield from engine.route_part(pctx.storage, part.payload["uri"], part.payload.get("removed"), self.config.batch_rows, pctx.count)

    def _report(self, ctx, stats: dict[str, Any], per_source: dict[str, int]) -> None:
        from stages.dedup.plots import component_size_histogram

        total = sum(per_source.values())
        for key in ("edges", "verified_edges", "members", "components", "removed", "rounds", "partitions"):
            ctx.log_metric(f"dedup.{key}", stats[key])
        ctx.log_metric("dedup.rate", stats["removed"] / total if total else 0.0)
        for source, n in sorted(per_source.items()):
            ctx.log_metric(f"dedup.rate.{source}", stats["removed_per_source"].get(source, 0) / n if n else 0.0)
        ctx.set_summary(DedupSummary(**{**stats, "component_sizes": dict(sorted(stats["component_sizes"].items()))}))
        ctx.log_artifact("component_sizes.png", component_size_histogram(stats["component_sizes"], f"{self.name}: component sizes"))


@register
class ExactDedup(_DedupStage):
    name = "exact_dedup"
    version = "2"
    description = "Remove documents whose normalized text (and optionally URL) equals another's; keep one per group."
    Config = ExactDedupConfig

    def _columns(self) -> list[str]:
        return ["id", "text", "source"] + (["url"] if self.config.urls else [])

    def _keys(self, ctx):
        cols = (["text_key"] if self.config.text else []) + (["url_key"] if self.config.urls else [])
        return functools.partial(exact_keys, self.config), cols, ("text_key",), exact_reason


@register
class MinhashDedup(_DedupStage):
    name = "minhash_dedup"
    version = "2"
    description = "Remove near-duplicates: MinHash signatures (datasketch-equal), LSH buckets, connected components."
    Config = MinhashDedupConfig

    def _keys(self, ctx):
        b, r = self.config.lsh_params()
        ctx.log_metric("lsh.bands", b)
        ctx.log_metric("lsh.rows", r)
        ctx.log_metric("lsh.threshold", self.config.threshold)
        from stages.dedup.plots import s_curve

        ctx.log_artifact("s_curve.png", s_curve(b, r, self.config.threshold))
        return functools.partial(minhash_keys, self.config, b, r), [f"band_{i:03d}" for i in range(b)], (), near_reason
