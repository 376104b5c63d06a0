"""Perplexity and bits per byte, per domain: on the tokenize stage's validation split, and on any
JSONL/Parquet text set given by path.

* **Validation split** (packed ``seq_len + 1`` rows with a ``source`` column): each row scores its
  last ``seq_len`` tokens given the ones before, exactly as training's validation loss does. The
  bytes of a scored token are the UTF-8 bytes it stands for: the tokenize stage uses a byte-level
  BPE with no normaliser, so the bytes of a row's tokens, concatenated, *are* the UTF-8 bytes of
  the text they came from (special tokens such as EOS stand for no text: 0 bytes).
* **Text sets**: each document is tokenized on its own, scored with lm-eval's rolling windows
  (the first token conditioned on the prefix token, no document ever sees another), and its bytes
  are ``len(text.encode("utf-8"))``.

Per domain: ``bits_per_byte``, ``perplexity`` (per token), and the macro average over domains
(Paloma's headline) -- see :func:`stages.scoring.metrics.domain_metrics`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from pipeline.io import json_lines
from stages.scoring.lm import Scorer, rolling_windows
from stages.scoring.metrics import TextTotals


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes per token id. Exact for byte-level BPE (every piece maps to bytes; special
    tokens map to none); for other tokenizers, the bytes of the decoded piece (a token that holds
    part of a multi-byte character then counts the replacement character)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    sizes = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    special = {int(i) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    config = json.loads(tokenizer.to_str())
    byte_level = (config.get("decoder") or {}).get("type") == "ByteLevel"
    decode_map = {c: b for b, c in _bytes_to_unicode().items()}
    for piece, idx in vocab.items():
        if idx in special:
            continue
        if byte_level and all(ch in decode_map for ch in piece):
            sizes[idx] = len(piece)
        else:
            sizes[idx] = len(tokenizer.decode([idx], skip_special_tokens=False).encode("utf-8"))
    return sizes


def validation_bpb(scorer: Scorer, tokens: np.ndarray, sources: list[str], byte_lengths: np.ndarray,
                   max_rows_per_domain: Optional[int] = None) -> dict[str, TextTotals]:
    """Per source: NLL, tokens and bytes of every row's targets ``tokens[:, 1:]`` given ``tokens[:, :-1]``."""
    by_domain: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        by_domain.setdefault(s, []).append(i)
    out: dict[str, TextTotals] = {}
    for domain, idx in sorted(by_domain.items()):
        if max_rows_per_domain is not None:
            idx = idx[:max_rows_per_domain]
        rows = tokens[idx].astype(np.int64)
        if rows.size and int(rows.max()) >= len(byte_lengths):
            raise ValueError(f"validation split ({domain}): token id {int(rows.max())} but the tokenizer has {len(byte_lengths)} tokens: "
                             "these shards were not made with this tokenizer")
        windows = [(r[:-1].tolist(), r[1:].tolist()) for r in rows]
        nll = scorer.token_nll(windows)
        totals = TextTotals()
        for (_, targets), values in zip(windows, nll):
            totals.add(float(values.sum()), len(targets), int(byte_lengths[np.asarray(targets)].sum()))
        totals.docs = len(idx)
        out[domain] = totals
    return out


def text_bpb(scorer: Scorer, texts: list[str], domains: list[str], prefix_token: int) -> dict[str, TextTotals]:
    """Per domain: NLL over every token of every document, and the documents' UTF-8 bytes."""
    encoded = scorer.tokenizer.encode_batch(texts, add_special_tokens=False)
    windows, owner = [], []
    for d, enc in enumerate(encoded):
        for w in rolling_windows(list(enc.ids), prefix_token, scorer.max_len):
            windows.append(w)
            owner.append(d)
    nll = scorer.token_nll(windows)
    per_doc = np.zeros(len(texts))
    tokens_per_doc = np.zeros(len(texts), dtype=np.int64)
    for d, values in zip(owner, nll):
        per_doc[d] += float(values.sum())
        tokens_per_doc[d] += len(values)
    out: dict[str, TextTotals] = {}
    for d, (text, domain) in enumerate(zip(texts, domains)):
        if not text:
            continue
        out.setdefault(domain, TextTotals()).add(per_doc[d], int(tokens_per_doc[d]), len(text.encode("utf-8")), 1)
    return out


def read_text_set(path: str, storage: Any, text_field: str, domain_field: Optional[str], default_domain: str,
                  max_docs: Optional[int] = None) -> tuple[list[str], list[str], str]:
    """(texts, domains, sha256) of a JSONL (optionally .gz/.zst) or Parquet file."""
    import hashlib
    import io

    from pipeline import storage as st

    storage = storage or st.Storage()
    data = storage.read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if text_field not in table.column_names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {table.column_names})")
        texts = [t or "" for t in table.column(text_field).to_pylist()]
        domains = ([str(x) for x in table.column(domain_field).to_pylist()] if domain_field and domain_field in table.column_names
                   else [default_domain] * len(texts))
    else:
        if path.endswith(".zst"):
            import zstandard

            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        elif path.endswith(".gz"):
            import gzip

            data = gzip.decompress(data)
        texts, domains = [], []
        for loc, record in json_lines(data.decode("utf-8").splitlines(), path):
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{loc}: needs a string field {text_field!r}")
            texts.append(record[text_field])
            domains.append(str(record.get(domain_field, default_domain)) if domain_field else default_domain)
    if max_docs is not None:
        texts, domains = texts[:max_docs], domains[:max_docs]
    return texts, domains, digest
