"""``extract_html``: crawled pages (``warc_ingest`` rows) -> main-content text.

Per row: the payload is decoded (declared charset, ``<meta>``, UTF-8, then detection), the
chosen extractor keeps the main content, and the row gets ``text``, ``extractor`` (name and
version), ``html_charset`` and ``html_charset_source``. ``text/plain`` rows (WET records) are
decoded only. Extraction runs in a worker process with a hard per-page time limit
(``sandbox.py``): a page that makes the extractor loop is quarantined as ``extract_timeout`` and
the next page goes to a fresh worker.

Reasons: rejected ``html_too_large`` (over ``max_html_bytes``, not parsed), ``no_text`` (fewer
than ``min_chars`` characters extracted); quarantined ``missing_payload``, ``undecodable_html``,
``extract_error`` (the extractor raised), ``extract_timeout``, ``extract_crashed``.

Timeouts depend on the machine's speed and load, so a page near the limit can fall either side
of it on two runs: the default limit is ~100x a typical page's time, so only pages that loop
reach it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.registry import register
from pipeline.stage import DROP_REASON, QUARANTINE_REASON, Resources, RowStage
from stages.columns import set_column
from stages.web import extractors
from stages.web.sandbox import ExtractorProcess

HTML_TOO_LARGE = "html_too_large"
NO_TEXT = "no_text"
MISSING_PAYLOAD = "missing_payload"


class ExtractConfig(StrictModel):
    extractor: Literal["resiliparse", "trafilatura", "function"] = Field(
        default="resiliparse", description="resiliparse (DCLM's, fast), trafilatura (FineWeb's), or function: a user's"
                                           " module:function given in `function`")
    function: Optional[str] = Field(default=None, description="with extractor: function, 'module:function' taking the"
                                                              " decoded HTML (str) and returning text")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the extractor (e.g. resiliparse"
                                                                      " links: true, trafilatura favor_precision: true)")
    timeout_seconds: float = Field(default=5.0, gt=0, description="hard limit per page; the worker is killed past it")
    max_html_bytes: int = Field(default=4 << 20, ge=1, description="larger payloads are rejected unparsed (html_too_large)")
    min_chars: int = Field(default=1, ge=0, description="fewer characters extracted: rejected (no_text)")
    memory_limit_mb: Optional[int] = Field(default=4096, ge=256, description="address-space limit of the extraction worker")
    keep_payload: bool = Field(default=False, description="keep the payload column (bytes as crawled) in the output")

    @model_validator(mode="after")
    def _function_given(self) -> "ExtractConfig":
        if (self.extractor == "function") != (self.function is not None):
            raise ValueError("set `function: module:function` exactly when extractor is function")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: write it as module:function")
        return self


@register
class ExtractHtml(RowStage):
    name = "extract_html"
    version = "1"
    description = "Main-content text from crawled HTML (resiliparse or trafilatura) with charset detection, a size cap and a hard per-page time limit."
    Config = ExtractConfig
    requires = ("payload", "content_type", "charset")
    produces = ("text", "extractor", "html_charset", "html_charset_source")
    removes = ("payload",)  # unless keep_payload
    # resiliparse also decodes; trafilatura's own dependencies (lxml, justext, ...) are in fingerprint_extras
    libraries = ("pyarrow", "resiliparse", "trafilatura")
    resources = Resources(num_cpus=1, actors=True, batch_size=512)

    def __init__(self, config: ExtractConfig, seed: int = 0):
        super().__init__(config, seed)
        self.worker: Optional[ExtractorProcess] = None
        if config.extractor == "function":
            self.label = f"function {config.function}"
        else:
            self.label = f"{config.extractor} {extractors.library_versions(config.extractor)[config.extractor]}"

    def fingerprint_extras(self, ctx) -> dict[str, Any]:
        extras: dict[str, Any] = {"libraries": extractors.library_versions(self.config.extractor)}  # with their dependencies
        if self.config.function:
            extras["function_source_sha256"] = extractors.function_digest(self.config.function)
        return extras

    def setup(self) -> None:
        cfg = self.config
        spec = {"extractor": cfg.extractor, "function": cfg.function, "options": cfg.options, "memory_limit_mb": cfg.memory_limit_mb}
        self.worker = ExtractorProcess(spec, cfg.timeout_seconds)
        self.worker.start()

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.worker is None:
            self.setup()
        cfg = self.config
        n = batch.num_rows
        payloads = batch.column("payload").to_pylist()
        content_types = batch.column("content_type").to_pylist()
        charsets = batch.column("charset").to_pylist()
        text: list[Optional[str]] = [None] * n
        html_charset: list[Optional[str]] = [None] * n
        charset_source: list[Optional[str]] = [None] * n
        drop: list[Optional[str]] = [None] * n
        quarantine: list[Optional[str]] = [None] * n
        todo = []
        for i, payload in enumerate(payloads):
            if payload is None:
                quarantine[i] = MISSING_PAYLOAD
            elif len(payload) > cfg.max_html_bytes:
                drop[i] = HTML_TOO_LARGE
            else:
                todo.append(i)
        results = self.worker.run([(payloads[i], content_types[i] or "", charsets[i] or "") for i in todo]) if todo else []
        for i, result in zip(todo, results):
            if result.reason is not None:
                quarantine[i] = result.reason
                continue
            text[i], html_charset[i], charset_source[i] = result.text, result.charset, result.charset_source
            if len(result.text.strip()) < cfg.min_chars:
                drop[i] = NO_TEXT
        plain = set(extractors.PLAIN_TYPES)
        labels = [None if payloads[i] is None else ("plain_text" if content_types[i] in plain else self.label) for i in range(n)]
        out = batch if cfg.keep_payload else batch.drop_columns(["payload"])
        for name, values in (("text", text), ("extractor", labels), ("html_charset", html_charset),
                             ("html_charset_source", charset_source), (DROP_REASON, drop), (QUARANTINE_REASON, quarantine)):
            out = set_column(out, name, pa.array(values, pa.string()))
        return out
