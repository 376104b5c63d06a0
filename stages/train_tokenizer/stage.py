"""train_tokenizer: a byte-level BPE trained on a seeded sample of the corpus, or an existing one.

Byte-level BPE (GPT-2 style, HF ``tokenizers``) with no normaliser and no prefix space, so every
string round-trips exactly: ``decode(encode(text)) == text`` for newlines, tabs, runs of spaces,
code indentation and any script (bytes are the alphabet).

The sample is bounded and streamed from workers; the driver never reads the corpus. One task per
input file keeps the documents whose keyed hash of the id falls below ``f = min(1, 1.1 *
sample_chars / corpus chars)`` (:func:`sample_part`), writes them with their hash bin (one of
1,024 equal bins of [0, f)) to a work file, and returns the characters it kept per bin. The driver
sums those histograms (O(bins)) and keeps the largest set of whole bins whose characters fit in
``sample_chars`` (:func:`cutoff_bin`), then streams the work files in input order, batch by batch,
into the BPE trainer. So the sample holds at most ``sample_chars`` characters (the one exception:
when the first bin alone exceeds it, that bin is the sample), it is about that size, and which
documents it holds depends on the seed and the ids only: the same config and input give the same
``tokenizer.json`` however many workers run the tasks.

Outputs: ``tokenizer.json`` under the attempt folder (its path, relative to the stage folder, is
in the manifest under ``tokenizer.path``), the same file as an MLflow artifact, and a one-row
``data`` dataset describing it (what a downstream stage reads by default).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, StageContext
from pipeline.io import iter_parquet_batches
from pipeline.registry import register
from pipeline.stage import DatasetStage, Resources
from stages.sample.stage import keep_score
from stages.summaries.train_tokenizer import TokenizerSummary

TOKENIZER_FILE = "tokenizer.json"
SAMPLE_BINS = 1024
OVERSAMPLE = 1.1  # the tasks keep ~10% more than the bound, so whole bins can fill it
WORK = "_work"


class SpecialTokens(StrictModel):
    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"


class TrainTokenizerConfig(StrictModel):
    path: Optional[PathStr] = Field(default=None, description="use this tokenizer.json (local or s3://) instead of training")
    vocab_size: int = Field(default=32768, ge=300, le=1 << 22)
    min_frequency: int = Field(default=2, ge=1)
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    sample_chars: int = Field(default=200_000_000, ge=1,
                              description="train on a seeded sample of at most (and about) this many characters, streamed from workers")
    max_token_chars: int = Field(default=32, ge=1, description="longest token the trainer may build (characters)")
    batch_rows: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _distinct(self):
        s = self.special_tokens
        if len({s.bos, s.eos, s.pad}) != 3:
            raise ValueError("special_tokens.bos, eos and pad must differ")
        return self


def new_bpe(config: TrainTokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterator[list[str]], config: TrainTokenizerConfig):
    """Train a byte-level BPE on batches of texts; the special tokens get ids 0, 1, 2 (bos, eos, pad)."""
    from tokenizers import pre_tokenizers, trainers

    tok = new_bpe(config)
    s = config.special_tokens
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[s.bos, s.eos, s.pad],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=config.max_token_chars,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_ids(tok, special: SpecialTokens) -> dict[str, int]:
    ids = {}
    for role in ("bos", "eos", "pad"):
        token = getattr(special, role)
        i = tok.token_to_id(token)
        if i is None:
            i = tok.add_special_tokens([token]) and tok.token_to_id(token)
        ids[f"{role}_id"] = int(i)
    return ids


def describe(tok, special: SpecialTokens) -> dict[str, Any]:
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True), **special_ids(tok, special),
            "bos": special.bos, "eos": special.eos, "pad": special.pad}


@register
class TrainTokenizer(DatasetStage):
    name = "train_tokenizer"
    version = "2"
    description = "Train a byte-level BPE on a seeded sample of the corpus (or load a tokenizer.json)."
    Config = TrainTokenizerConfig
    requires = ("id", "text")
    produces = ("tokenizer_path", "vocab_size", "bos_id", "eos_id", "pad_id", "sha256")
    new_rows = True
    removes = ()
    num_inputs = (0, 1)
    uses_seed = True
    measure_column = None
    resources = Resources(num_cpus=1)
    libraries = ("pyarrow", "numpy", "tokenizers")  # tokenizers trains the BPE
    Summary = TokenizerSummary

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        if self.config.path is None:
            return []
        return [ExternalInput("tokenizer", self.config.path, ({"uri": self.config.path, **ctx.storage.file_identity(self.config.path)},))]

    def sample(self, ctx: StageContext) -> tuple[list[str], int, float]:
        """The bounded sample (see the module docstring): its files in input-file order, the bins
        kept, and the fraction of the input they hold."""
        c = self.config
        src = ctx.inputs[0]
        total_chars = src.chars
        fraction = 1.0 if total_chars <= 0 else min(1.0, OVERSAMPLE * c.sample_chars / total_chars)
        work = st.join(ctx.attempt_uri, WORK)
        items = [(ctx.storage, uri, st.join(work, f"sample-{i:05d}.arrow"), self.seed, fraction, c.batch_rows)
                 for i, uri in enumerate(src.files())]
        res = ctx.resources
        parts = ctx.fan_out.map(sample_part, items, step="sample", num_cpus=res.num_cpus or 1, max_parallel=res.max_workers)
        hist = np.zeros(SAMPLE_BINS, dtype=np.int64)
        for p in parts:
            hist += p["chars"]
        cut = cutoff_bin(hist, c.sample_chars)
        return [p["uri"] for p in parts if p["uri"] is not None], cut, fraction * cut / SAMPLE_BINS

    def run(self, ctx: StageContext) -> None:
        from tokenizers import Tokenizer

        c = self.config
        if c.path is not None:
            tok = Tokenizer.from_str(ctx.storage.read_bytes(c.path).decode("utf-8"))
            origin: dict[str, Any] = {"loaded_from": c.path}
        else:
            if not ctx.inputs:
                raise ValueError("train_tokenizer needs an input dataset to train on, or config.path to load a tokenizer")
            if ctx.inputs[0].num_rows == 0:
                raise ValueError(f"stage {ctx.stage_name!r}: its input {ctx.inputs[0].ref} has no documents to train a tokenizer on"
                                 f" (see the funnel of the stages before it), or set config.path to load one")
            files, cut, fraction = self.sample(ctx)
            # the training reads the sample and holds the BPE's counts: a worker's work, not the driver's
            trained = ctx.fan_out.map(train_on_sample, [(ctx.storage, files, cut, c)], step="train",
                                      num_cpus=ctx.resources.num_cpus or 1)[0]
            ctx.storage.rm(st.join(ctx.attempt_uri, WORK))
            tok = Tokenizer.from_str(trained["tokenizer"])
            origin = {"trained_on_docs": trained["docs"], "trained_on_chars": trained["chars"], "sample_fraction": round(fraction, 6)}
        info = describe(tok, c.special_tokens)  # adds missing special tokens to a loaded tokenizer
        data = tok.to_str().encode("utf-8")
        rel = f"{ctx.attempt}/{TOKENIZER_FILE}"
        ctx.storage.write_bytes_atomic(st.join(ctx.stage_dir, rel), data)
        info.update({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), **origin})
        ctx.log_artifact(TOKENIZER_FILE, data)
        ctx.log_metric("vocab_size", info["vocab_size"])
        ctx.set_summary(TokenizerSummary(**info))
        out = ctx.part_outputs("00000", measure_column=None)
        out.write("data", pa.table({
            # the file's name beside the data, not its attempt folder: same input, same bytes
            "tokenizer_path": [TOKENIZER_FILE], "vocab_size": [info["vocab_size"]], "bos_id": [info["bos_id"]], "eos_id": [info["eos_id"]],
            "pad_id": [info["pad_id"]], "sha256": [info["sha256"]],
        }))
        ctx.add_part_result(out.close(rows_in=origin.get("trained_on_docs", 0)))


def train_on_sample(storage: st.Storage, files: list[str], cut: int, config: TrainTokenizerConfig) -> dict[str, Any]:
    """Train the BPE on the sampled documents of ``files`` (in order) whose bin is below ``cut``;
    returns the tokenizer as JSON and what it was trained on."""
    seen = {"docs": 0, "chars": 0}

    def texts() -> Iterator[list[str]]:
        for uri in files:
            with storage.open(uri, "rb") as f:
                for batch in _iter_batches(f):
                    keep = np.asarray(batch.column("bin")) < cut
                    kept = [t for t, k in zip(batch.column("text").to_pylist(), keep.tolist()) if k]
                    seen["docs"] += len(kept)
                    seen["chars"] += sum(len(t) for t in kept)
                    if kept:
                        yield kept

    tok = train_bpe(texts(), config)
    return {"tokenizer": tok.to_str(), **seen}


def _iter_batches(f) -> Iterator[pa.RecordBatch]:
    reader = pa.ipc.open_file(f)
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def sample_bin(doc_id: str, seed: int, fraction: float) -> int:
    """The sample bin of a document: 0..SAMPLE_BINS-1 when its keyed hash is below ``fraction``, else -1."""
    score = keep_score(doc_id, seed)
    if score >= fraction:
        return -1
    return min(int(score / fraction * SAMPLE_BINS), SAMPLE_BINS - 1)


def sample_part(storage: st.Storage, uri: str, out_uri: str, seed: int, fraction: float, batch_rows: int) -> dict[str, Any]:
    """One input file's sampled documents (non-empty, hash below ``fraction``) to ``out_uri`` with
    their bin, streamed in batches; returns the characters kept per bin."""
    chars = np.zeros(SAMPLE_BINS, dtype=np.int64)
    schema = pa.schema([("bin", pa.int16()), ("text", pa.large_string())])
    sink = writer = None
    try:
        for batch in iter_parquet_batches(storage, uri, batch_rows, columns=["id", "text"]):
            bins, texts = [], []
            for i, t in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()):
                b = sample_bin(i, seed, fraction) if t else -1
                if b >= 0:
                    bins.append(b)
                    texts.append(t)
                    chars[b] += len(t)
            if not texts:
                continue
            if writer is None:
                storage.makedirs(out_uri.rsplit("/", 1)[0])
                sink = storage.open(out_uri, "wb")
                writer = pa.ipc.new_file(sink, schema)
            writer.write_batch(pa.record_batch([pa.array(bins, pa.int16()), pa.array(texts, pa.large_string())], schema=schema))
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    return {"uri": out_uri if writer is not None else None, "chars": chars}  # 8 KiB per file on the driver


def cutoff_bin(chars_per_bin: np.ndarray, bound: int) -> int:
    """The number of leading bins whose characters together fit in ``bound`` (at least one)."""
    fits = np.nonzero(np.cumsum(chars_per_bin) <= bound)[0]
    return max(1, int(fits[-1]) + 1 if len(fits) else 0)


def load_tokenizer(storage: st.Storage, uri: str):
    from tokenizers import Tokenizer

    if st.is_remote(uri):
        return Tokenizer.from_str(storage.read_bytes(uri).decode("utf-8"))
    return Tokenizer.from_file(uri)
