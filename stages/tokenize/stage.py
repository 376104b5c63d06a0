"""tokenize: documents -> packed, mixed, shuffled token sequences in Arrow IPC shards.

Inputs: the documents (``id``, ``text``, ``source``) and a ``train_tokenizer`` stage. Outputs:
``train`` and ``validation``, Arrow IPC shards with ``tokens`` (fixed_size_list<uint16|uint32>
[seq_len + 1]; uint16 iff the vocabulary fits), ``source`` (of the sequence's first token),
``doc_ids`` / ``doc_offsets`` / ``doc_copies`` (the document segments a sequence holds, where
each starts, and which mixture copy it is) and ``seq_id`` (position in its packing stream: a
document's segments, read in ``seq_id`` order, are the document). Each shard is written in record
batches of ``rows_per_batch`` sequences (about 1 MiB of tokens; in the shard's schema metadata as
``lmpipe.rows_per_batch`` and in the summary), so a reader can fetch one batch by random access;
the manifest lists every shard with its row count.

Steps (see :mod:`stages.tokenize.packing`): validation score summaries per input file (the k
smallest scores per source: the driver never sees a document id) -> encode every input file in
parallel (Rust batch API, EOS appended, BOS optional; validation held out per source by a keyed
hash of the document id, before packing) -> mixture rates per source from the token counts ->
pack each part (seeded order, deterministic copies), each sequence sent to one of B buckets by a
keyed hash, and all parts' tails packed together in one task -> one writer per bucket reads only
its bucket from every packed file, shuffles it (seeded) and writes one shard. B is the expected
number of sequences over ``shard_sequences`` (not the number of workers). Token counts per source
and split, target and achieved mixture shares, bytes packed and read back, and the tokenizer
(copied next to the shards) go into the manifest under ``tokenize``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from pydantic import Field, field_validator

from pipeline import storage as st
from pipeline.config import PerformanceField, StrictModel
from pipeline.context import StageContext
from pipeline.contracts import PartResult
from pipeline.registry import register
from pipeline.stage import DatasetStage, Resources
from stages.tokenize import packing as pk
from stages.summaries.tokenize import MixtureReport, TokenizeSummary
from stages.summaries.train_tokenizer import TokenizerSummary

WORK = "_work"


class TokenizeConfig(StrictModel):
    seq_len: int = Field(default=2048, ge=1, description="tokens a model sees per sequence (shards hold seq_len + 1)")
    add_bos: bool = Field(default=False, description="prepend BOS to every document (EOS is always appended)")
    validation_fraction: float = Field(default=0.01, ge=0, lt=1, description="documents held out per source for validation")
    min_validation_docs: int = Field(default=1, ge=0, description="per source, hold out at least this many documents (if it has more)")
    mixture: Optional[dict[str, float]] = Field(
        default=None, description="train token share per source (normalised); sources not listed are left out. None: natural mix"
    )
    total_tokens: Optional[int] = Field(default=None, ge=1, description="train tokens after mixing (default: the train tokens before)")
    max_copies: Optional[float] = Field(
        default=None, gt=0, description="cap on copies of one document when upsampling (the achieved share then falls short)"
    )
    shard_sequences: int = Field(default=8192, ge=1, description="sequences per Arrow shard, on average (each shard is one hash bucket)")
    record_batch_bytes: int = Field(default=1 << 20, ge=1, description="tokens per shard record batch, in bytes (what a loader fetches per random read)")
    batch_rows: int = PerformanceField(default=1024, ge=1, description="documents per encode_batch call (bounds memory)")
    threads_per_worker: Optional[int] = PerformanceField(default=None, ge=1, description="tokenizer threads per worker (default: its CPUs)")

    @field_validator("mixture")
    @classmethod
    def _weights(cls, v):
        if v is not None:
            if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return v


def mixture_rates(train_tokens: dict[str, int], mixture: Optional[dict[str, float]], total: Optional[int]) -> dict[str, float]:
    """Copies per document per source so that each source's share of train tokens is its weight."""
    if mixture is None:
        scale = 1.0 if total is None else total / max(sum(train_tokens.values()), 1)
        return {s: scale for s in train_tokens}
    missing = [s for s, w in mixture.items() if w > 0 and train_tokens.get(s, 0) == 0]
    if missing:
        raise ValueError(f"mixture names source(s) {missing} with no training tokens (sources: {sorted(train_tokens)})")
    weight_sum = sum(mixture.values())
    target = total if total is not None else sum(train_tokens.values())
    return {s: (mixture.get(s, 0.0) / weight_sum) * target / n for s, n in train_tokens.items()}


@register
class Tokenize(DatasetStage):
    name = "tokenize"
    version = "2"
    description = "Encode, pack (no padding, token-level lineage), mix, shuffle and shard documents as Arrow IPC."
    Config = TokenizeConfig
    requires = ("id", "text", "source")
    produces = ("tokens", "source", "doc_ids", "doc_offsets", "doc_copies", "seq_id")
    new_rows = True
    num_inputs = (2, 2)
    outputs = ("train", "validation")
    output_formats = {"train": "arrow", "validation": "arrow"}
    uses_seed = True
    measure_column = None
    resources = Resources(num_cpus=1)
    libraries = ("pyarrow", "numpy", "tokenizers")  # tokenizers decides every token id
    Summary = TokenizeSummary

    def run(self, ctx: StageContext) -> None:
        c = self.config
        docs_in = ctx.inputs[0]
        if docs_in.num_rows == 0:
            raise ValueError(f"stage {ctx.stage_name!r}: its input {docs_in.ref} has no documents; nothing to tokenize"
                             f" (see the funnel of the stages before it)")
        tok, tok_stage = ctx.upstream(TokenizerSummary)
        tok_uri = tok_stage.path(tok.path)
        res = ctx.resources
        threads = c.threads_per_worker or max(1, int(res.num_cpus or 1))
        # Only encoding uses the tokenizer's threads; with one, it runs in the run's shared workers.
        fan = dict(num_cpus=res.num_cpus, max_parallel=res.max_workers)
        encode_fan = {**fan, "env": pk.threads_env(threads)} if threads > 1 else fan
        work = st.join(ctx.attempt_uri, WORK)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        thresholds = self._validation_thresholds(ctx, docs_in, fan)
        timings["validation_scores"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        encoded = self._encode(ctx, docs_in, tok_uri, tok, thresholds, work, encode_fan, threads)
        counts = _encoded_counts(encoded)
        train_tokens = {s: v["tokens"] for s, v in counts.get(pk.TRAIN, {}).items()}
        rates = mixture_rates(train_tokens, c.mixture, c.total_tokens)
        capped = sorted(s for s, r in rates.items() if c.max_copies is not None and r > c.max_copies)
        if c.max_copies is not None:
            rates = {s: min(r, c.max_copies) for s, r in rates.items()}
        timings["encode"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        dtype = pk.token_dtype(tok.vocab_size)
        buckets = self._buckets(counts, rates)
        pjob = pk.PackJob(c.seq_len, str(dtype), self.seed, rates, buckets)
        split_files, mixed_tokens, dropped_tail = self._pack(ctx, encoded, pjob, work, fan, num_files=len(docs_in.files()))
        timings["pack"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        rows, bytes_read = self._shuffle_write(ctx, split_files, pjob, pk.rows_per_batch(c.seq_len, dtype, c.record_batch_bytes), fan)
        timings["shuffle_write"] = time.perf_counter() - t2
        ctx.add_part_result(PartResult(part="docs", bytes_in=sum(e["bytes_in"] for e in encoded)))

        # the tokenizer travels with the shards: a training job needs nothing else
        rel_tok = f"{ctx.attempt}/tokenizer.json"
        ctx.storage.write_bytes_atomic(st.join(ctx.stage_dir, rel_tok), ctx.storage.read_bytes(tok_uri))
        train_total = sum(mixed_tokens[pk.TRAIN].values())
        summary = TokenizeSummary(
            seq_len=c.seq_len, vocab_size=tok.vocab_size, dtype=str(dtype), eos_id=tok.eos_id, bos_id=tok.bos_id,
            pad_id=tok.pad_id, add_bos=c.add_bos, tokenizer_path=rel_tok, tokenizer_sha256=tok.sha256,
            documents={split: {s: v["docs"] for s, v in per.items()} for split, per in counts.items()},
            tokens_encoded={split: {s: v["tokens"] for s, v in per.items()} for split, per in counts.items()},
            tokens=mixed_tokens, sequences=rows, tokens_in_sequences={s: n * (c.seq_len + 1) for s, n in rows.items()},
            dropped_tail_tokens=dropped_tail, buckets=buckets, rows_per_batch=pk.rows_per_batch(c.seq_len, dtype, c.record_batch_bytes),
            packed_bytes={split: sum(f["bytes"] for f in files) for split, files in split_files.items()},
            shuffle_bytes_read=bytes_read,
            mixture=MixtureReport(
                weights=c.mixture, rates={s: round(r, 6) for s, r in rates.items()}, capped_by_max_copies=capped,
                target_shares=({s: w / sum(c.mixture.values()) for s, w in c.mixture.items()} if c.mixture else None),
                achieved_shares={s: n / train_total for s, n in mixed_tokens[pk.TRAIN].items()} if train_total else {},
            ),
            timings={k: round(v, 3) for k, v in timings.items()},
        )
        ctx.set_summary(summary)
        # documents in -> documents packed (the funnel counts documents, the shards count sequences)
        docs_total = sum(v["docs"] for per in counts.values() for v in per.values())
        unmixed = sum(v["docs"] for s, v in counts.get(pk.TRAIN, {}).items() if rates.get(s, 1.0) == 0)
        ctx.set_counts(docs_total, docs_total - unmixed, {"not_in_mixture": unmixed} if unmixed else {})
        for split, n in rows.items():
            ctx.log_metric(f"sequences.{split}", n)
        for src, share in summary.mixture.achieved_shares.items():
            ctx.log_metric(f"share.{src}", share)
        ctx.log_metric("tokens.train", train_total)
        self._cleanup(ctx, work)

    # -- the phases ----------------------------------------------------------------------------------
    def _validation_thresholds(self, ctx: StageContext, docs_in, fan: dict) -> dict[str, float]:
        """Per source, the validation score threshold: from each file's k smallest scores per
        source (k = min_validation_docs), merged here in O(sources x k), never per document."""
        c = self.config
        if c.min_validation_docs <= 0 or c.validation_fraction <= 0:
            return {}  # every source uses the fraction as its threshold
        k = c.min_validation_docs
        summaries = ctx.fan_out.map(pk.score_part, [(ctx.storage, f, self.seed, k, c.batch_rows) for f in docs_in.files()],
                                    step="validation scores", **fan)
        return pk.thresholds_from_summary(pk.merge_score_summaries(summaries, k), c.validation_fraction, k)

    def _encode(self, ctx: StageContext, docs_in, tok_uri: str, tok: TokenizerSummary, thresholds: dict[str, float], work: str,
                fan: dict, threads: int) -> list[dict[str, Any]]:
        """Every input file encoded in parallel, each document's split decided before packing."""
        c = self.config
        files = docs_in.files()
        if tok.eos_id is None:
            raise ValueError(f"stage {ctx.stage_name!r}: the tokenizer has no EOS token to end documents with")
        job = pk.EncodeJob(tok_uri, tok.eos_id, tok.bos_id if c.add_bos else None, c.validation_fraction, thresholds, self.seed, c.batch_rows,
                           str(pk.token_dtype(tok.vocab_size)), threads)
        items = [(ctx.storage, f, st.join(work, "encoded", f"part-{i:05d}.arrow"), job) for i, f in enumerate(files)]
        return ctx.fan_out.map(pk.encode_part, items, step="encode", **fan)

    def _buckets(self, counts: dict[str, dict[str, dict[str, int]]], rates: dict[str, float]) -> dict[str, int]:
        """Buckets (shards) per split from the expected sequence count: tokens after mixing (train:
        each source's tokens times its rate) over seq_len + 1, over shard_sequences."""
        c = self.config
        expected = {
            pk.TRAIN: sum(v["tokens"] * rates.get(s, 0.0) for s, v in sorted(counts.get(pk.TRAIN, {}).items())),
            pk.VALIDATION: float(sum(v["tokens"] for _, v in sorted(counts.get(pk.VALIDATION, {}).items()))),
        }
        return {split: pk.num_buckets(n / (c.seq_len + 1), c.shard_sequences) for split, n in expected.items()}

    def _pack(self, ctx: StageContext, encoded: list[dict[str, Any]], pjob: pk.PackJob, work: str, fan: dict, num_files: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, int]], dict[str, int]]:
        """Each encoded part packed into bucketed files (seeded order, deterministic copies), then
        all parts' tails together in one task."""
        items = [(ctx.storage, e["uri"], i, st.join(work, "packed", f"part-{i:05d}"), pjob) for i, e in enumerate(encoded) if e["uri"]]
        packed = ctx.fan_out.map(pk.pack_part, items, step="pack", **fan)
        split_files: dict[str, list[dict[str, Any]]] = {pk.TRAIN: [], pk.VALIDATION: []}
        mixed_tokens: dict[str, dict[str, int]] = {pk.TRAIN: {}, pk.VALIDATION: {}}
        for p in packed:
            for split, f in p["files"].items():
                split_files[split].append(f)
            for split, per_source in p["tokens"].items():
                for src, n in per_source.items():
                    mixed_tokens[split][src] = mixed_tokens[split].get(src, 0) + n
        splits = (pk.TRAIN, pk.VALIDATION)
        tail_items = [(ctx.storage, [p["tails"][split] for p in packed if split in p["tails"]], split,
                       st.join(work, "packed", f"tails-{split}.arrow"), pjob, (num_files + 1) << 32) for split in splits]
        dropped_tail: dict[str, int] = {}
        for split, t in zip(splits, ctx.fan_out.map(pk.pack_tails, tail_items, step="pack tails", **fan)):
            if t["file"]:
                split_files[split].append(t["file"])
            dropped_tail[split] = t["dropped"]
        return split_files, mixed_tokens, dropped_tail

    def _shuffle_write(self, ctx: StageContext, split_files: dict[str, list[dict[str, Any]]], job: pk.PackJob,
                       batch_rows: int, fan: dict) -> tuple[dict[str, int], dict[str, int]]:
        """One writer per bucket: it reads that bucket's record batch of every packed file, shuffles
        and writes one shard. Returns sequences and bytes read per split."""
        rows: dict[str, int] = {}
        bytes_read: dict[str, int] = {}
        for split, packed_files in split_files.items():
            rows[split] = sum(f["rows"] for f in packed_files)
            bytes_read[split] = 0
            if rows[split] == 0:
                continue
            files = [{"uri": f["uri"], "bytes": f["bytes"]} for f in packed_files]
            items = [(ctx.storage, split, b, files, ctx.attempt_uri, ctx.attempt, job, batch_rows) for b in range(job.buckets[split])]
            for result, read in ctx.fan_out.map(pk.write_bucket, items, step=f"write {split} shards", **fan):
                bytes_read[split] += read
                ctx.add_part_result(result)
        return rows, bytes_read

    @staticmethod
    def _cleanup(ctx: StageContext, work: str) -> None:
        ctx.storage.rm(work)  # intermediate encoded/packed files: the shards hold everything


def _encoded_counts(encoded: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """split -> source -> {docs, tokens}, summed over the encoded parts."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for e in encoded:
        for split, per_source in e["counts"].items():
            for src, n in per_source.items():
                cur = counts.setdefault(split, {}).setdefault(src, {"docs": 0, "tokens": 0})
                cur["docs"] += n["docs"]
                cur["tokens"] += n["tokens"]
    return counts
