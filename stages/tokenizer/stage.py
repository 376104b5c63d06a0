"""train_tokenizer: a byte-level BPE trained on a seeded sample of the corpus, or an existing one.

Byte-level BPE (GPT-2 style, HF ``tokenizers``) with no normaliser and no prefix space, so every
string round-trips exactly: ``decode(encode(text)) == text`` for newlines, tabs, runs of spaces,
code indentation and any script (bytes are the alphabet). The sample is chosen by a keyed hash
of document ids (independent of file layout and worker count), sized to ``sample_chars``.

Outputs: ``tokenizer.json`` under the attempt folder (its path, relative to the stage folder, is
in the manifest under ``tokenizer.path``), the same file as an MLflow artifact, and a one-row
``data`` dataset describing it (what a downstream stage reads by default).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Optional

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, StageContext
from pipeline.io import iter_parquet_batches
from pipeline.registry import register
from pipeline.stage import DatasetStage, Resources
from stages.sample import keep_score
from stages.tokenizer.summary import TokenizerSummary

TOKENIZER_FILE = "tokenizer.json"


class SpecialTokens(StrictModel):
    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"


class TrainTokenizerConfig(StrictModel):
    path: Optional[PathStr] = Field(default=None, description="use this tokenizer.json (local or s3://) instead of training")
    vocab_size: int = Field(default=32768, ge=300, le=1 << 22)
    min_frequency: int = Field(default=2, ge=1)
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    sample_chars: int = Field(default=200_000_000, ge=1, description="train on a seeded sample of about this many characters")
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
    version = "1"
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
    Summary = TokenizerSummary

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        if self.config.path is None:
            return []
        return [ExternalInput("tokenizer", self.config.path, ({"uri": self.config.path, **ctx.storage.file_identity(self.config.path)},))]

    def sampled_texts(self, ctx: StageContext) -> Iterator[list[str]]:
        src = ctx.inputs[0]
        total_chars = int(src.manifest["datasets"][src.ref.dataset].get("chars") or 0)
        fraction = 1.0 if total_chars <= 0 else min(1.0, self.config.sample_chars / total_chars)
        self._sampled = {"docs": 0, "chars": 0, "fraction": fraction}
        for uri in src.files():
            for batch in iter_parquet_batches(ctx.storage, uri, self.config.batch_rows, columns=["id", "text"]):
                ids = batch.column("id").to_pylist()
                texts = batch.column("text").to_pylist()
                chosen = [t for i, t in zip(ids, texts) if t and (fraction >= 1.0 or keep_score(i, self.seed) < fraction)]
                self._sampled["docs"] += len(chosen)
                self._sampled["chars"] += sum(len(t) for t in chosen)
                if chosen:
                    yield chosen

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
            tok = train_bpe(self.sampled_texts(ctx), c)
            origin = {"trained_on_docs": self._sampled["docs"], "trained_on_chars": self._sampled["chars"],
                      "sample_fraction": round(self._sampled["fraction"], 6)}
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
        ctx.add_part_result(out.close(rows_in=self._sampled["docs"] if c.path is None else 0))


def load_tokenizer(storage: st.Storage, uri: str):
    from tokenizers import Tokenizer

    if st.is_remote(uri):
        return Tokenizer.from_str(storage.read_bytes(uri).decode("utf-8"))
    return Tokenizer.from_file(uri)
