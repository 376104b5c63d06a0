"""Word tokens for the quality rules: spaCy's English tokenizer, re-implemented for batches.

The published Gopher/C4/FineWeb rules count words and sentences, and their reference
implementation (datatrove) gets both from spaCy's English tokenizer and sentencizer, which is
~90% of its run time. Thresholds such as "80% of words contain a letter" are sensitive to how
punctuation is split off, so this module follows spaCy's algorithm exactly (whitespace chunks,
then prefixes/suffixes/special cases, then infixes) using spaCy's own English rules, exported
to ``spacy_en_tokenizer.json`` (MIT licence) so spaCy is not needed at run time. Two things
make it fast: whitespace splitting runs as an Arrow kernel over a whole batch, and only the
*distinct* chunks that hold punctuation go through the Python affix loop (memoised, as spaCy
itself does); tokens come out as ids into the batch's vocabulary, so per-token attributes are
computed once per distinct token.

The character sets below come from datatrove (Apache-2.0) and spaCy (MIT), so the rules mean
the same thing here as there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.filters import kernels

# datatrove.utils.text.PUNCTUATION: a word made only of these (or TERMINAL_PUNCTUATION) is a
# "symbol", not a word, for the Gopher word-count and mean-word-length rules.
PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + "".join(
    map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)))
)
# datatrove.utils.text.TERMINAL_PUNCTUATION: FineWeb's "line ends with punctuation" set.
TERMINAL_PUNCTUATION = frozenset(
    "!.?։؝؞؟۔܀܁܂߹࠷࠹࠽࠾।॥၊။።፧፨᙮᜵᜶។៕៖៙៚᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᭽᭾᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼⹓⹔。꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？｡"
    "𐩖𐩗𐽕𐽖𐽗𐽘𐽙𐾆𐾇𐾈𐾉𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑥄𑥆𑩂𑩃𑪛𑪜𑱁𑱂𑻷𑻸\U00011f43\U00011f44𖩮𖩯𖫵𖬷𖬸𖭄𖺘𛲟𝪈"
)
PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION
# spaCy's Sentencizer.default_punct_chars: a token equal to one of these ends a sentence.
SENTENCE_PUNCT = frozenset(
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？"
    "𐩖𐩗𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑩂𑩃𑪛𑪜𑱁𑱂𖩮𖩯𖫵𖬷𖬸𖭄𛲟𝪈｡。"
)


def re2_class(chars) -> str:
    """An RE2 character class (for Arrow's regex kernels) holding exactly ``chars``."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(set(chars))) + "]"


_RULES = json.loads((Path(__file__).with_name("spacy_en_tokenizer.json")).read_text(encoding="utf-8"))
_PREFIX = re.compile("|".join("^" + p for p in _RULES["prefixes"]))
_SUFFIX = re.compile("|".join(s + "$" for s in _RULES["suffixes"]))
_INFIX = re.compile("|".join(_RULES["infixes"]))
_URL = re.compile(_RULES["url_match"])
SPECIALS: dict[str, list[str]] = _RULES["specials"]
# Chunks made only of letters and digits that spaCy still splits: special cases ("cannot",
# "gonna") and a number followed by a unit ("500m"); everything else of that shape is one token.
_PLAIN_SPECIALS = pa.array(sorted(k for k in SPECIALS if k.isalnum()), pa.string())
_NEEDS_AFFIX_RULES = r"[^\pL\pN]|\pN\pL+$"


# The commonest chunks that hold punctuation: an ASCII word (or words joined by single hyphens)
# with an opening bracket or quote before it and up to two closing marks after it ("word,",
# "(word", "word.)", "well-known"). For them the affix rules always peel exactly these
# one-character prefixes and suffixes (none has a lookbehind that an ASCII letter could fail; "."
# only after a lowercase letter, by spaCy's rule for it), the infix rule splits at each hyphen, and
# nothing else matches, unless a special case intervenes: any window of the resulting tokens that
# is a special case sends the chunk through the full rules (split_chunk). Checked against
# split_chunk on every distinct chunk of the news and Shakespeare corpora
# (tests/stages/test_filters_quality.py).
_FAST_PREFIX = frozenset('(["{')
_FAST_SUFFIX = frozenset(',:;!?)]}"')


def _split_fast(chunk: str) -> Optional[list[str]]:
    """The tokens of a chunk of the common shape above, or None: use split_chunk."""
    start = 1 if chunk[0] in _FAST_PREFIX else 0
    end = len(chunk)
    suffixes = 0
    while end > start and suffixes < 2:
        last = chunk[end - 1]
        if last in _FAST_SUFFIX or (last == "." and end - 1 > start and "a" <= chunk[end - 2] <= "z"):
            end -= 1
            suffixes += 1
        else:
            break
    core = chunk[start:end]
    if not core or not core.isascii():
        return None
    if core.isalpha():
        if start == 0 and suffixes == 0:
            return None
        words_ = [core]
    else:  # words joined by single hyphens ("well-known"): the infix rule splits at each hyphen
        words_ = core.split("-")
        if len(words_) < 2 or not all(w.isalpha() for w in words_):
            return None
        words_ = list(chain.from_iterable((w, "-") for w in words_))[:-1]
    tokens = ([chunk[0]] if start else []) + words_ + list(chunk[end:])
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens) + 1):
            if "".join(tokens[i:j]) in SPECIALS:
                return None
    return tokens


def split_chunk(chunk: str) -> list[str]:
    """spaCy's Tokenizer._split_affixes + _attach_tokens for one whitespace-free chunk."""
    special = SPECIALS.get(chunk)
    if special is not None:
        return special
    string = chunk
    prefixes: list[str] = []
    suffixes: list[str] = []
    last_size = 0
    while string and len(string) != last_size:
        if string in SPECIALS:
            break
        last_size = len(string)
        m = _PREFIX.search(string)
        pre_len = m.end() - m.start() if m else 0
        if pre_len:
            prefix, minus_pre = string[:pre_len], string[pre_len:]
            if minus_pre and minus_pre in SPECIALS:
                string = minus_pre
                prefixes.append(prefix)
                break
        m = _SUFFIX.search(string[pre_len:])
        suf_len = m.end() - m.start() if m else 0
        if suf_len:
            suffix, minus_suf = string[-suf_len:], string[:-suf_len]
            if minus_suf and minus_suf in SPECIALS:
                string = minus_suf
                suffixes.append(suffix)
                break
        if pre_len and suf_len and pre_len + suf_len <= len(string):
            string = string[pre_len:-suf_len]
            prefixes.append(prefix)
            suffixes.append(suffix)
        elif pre_len:
            string = minus_pre
            prefixes.append(prefix)
        elif suf_len:
            string = minus_suf
            suffixes.append(suffix)
    tokens = prefixes
    if string:
        special = SPECIALS.get(string)
        if special is not None:
            tokens.extend(special)
        elif _URL.match(string):
            tokens.append(string)
        else:
            start = 0
            for m in _INFIX.finditer(string):
                if m.start() == 0:
                    continue
                if m.start() != start:
                    tokens.append(string[start : m.start()])
                if m.start() != m.end():
                    tokens.append(string[m.start() : m.end()])
                start = m.end()
            if start < len(string):
                tokens.append(string[start:])
    tokens.extend(reversed(suffixes))
    if len(tokens) > 1:
        tokens = _merge_affix_specials(tokens)
    # datatrove strips every token and drops the empty ones
    return [t for t in (t.strip() for t in tokens) if t]


# Special cases that hold affix characters ("Calif.", "):", "''") are matched after splitting,
# over the token sequence (spaCy's _apply_special_cases), longest match first.
_AFFIX_SPECIALS = {k for k in SPECIALS if not k.isalnum() and len(k) > 1}
_MAX_SPECIAL_TOKENS = 4


def _merge_affix_specials(tokens: list[str]) -> list[str]:
    out: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        for j in range(min(n, i + _MAX_SPECIAL_TOKENS), i + 1, -1):
            key = "".join(tokens[i:j])
            if key in _AFFIX_SPECIALS:
                out.extend(SPECIALS[key])
                i = j
                break
        else:
            out.append(tokens[i])
            i += 1
    return out


_CACHE: dict[str, list[str]] = {}
_CACHE_LIMIT = 500_000


def _split_cached(chunk: str) -> list[str]:
    toks = _CACHE.get(chunk)
    if toks is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        toks = _split_fast(chunk)
        if toks is None:
            toks = split_chunk(chunk)
        _CACHE[chunk] = toks
    return toks


def list_offsets(lists: pa.Array) -> np.ndarray:
    """Start offsets (n+1, from 0) of a list array's elements in its ``flatten()``."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


@dataclass
class TokenBatch:
    """The word tokens of a batch of texts, as ids into the batch's vocabulary of distinct
    token strings: per-token attributes are computed once per distinct token and gathered.

    The whitespace chunks the tokens were split from are kept the same way (distinct chunks,
    ids, per-text offsets): rules defined on ``str.split()`` words (C4) and character counts that
    never span whitespace ("#", "...") are read from them instead of scanning the texts again."""

    vocab: pa.Array
    ids: np.ndarray  # int64, one per token, in text order
    offsets: np.ndarray  # per-text start offsets into ids (n + 1)
    chunks: pa.Array  # distinct whitespace-separated chunks (the empty string among them, if any)
    chunk_ids: np.ndarray  # int64, one per chunk, in text order
    chunk_offsets: np.ndarray  # per-text start offsets into chunk_ids (n + 1)

    @property
    def tokens(self) -> pa.Array:
        return self.vocab.take(pa.array(self.ids, pa.int64()))

    def per_token(self, values: np.ndarray) -> np.ndarray:
        """A per-vocabulary-entry array, gathered to one value per token."""
        return values[self.ids]

    def per_chunk(self, values: np.ndarray) -> np.ndarray:
        """A per-distinct-chunk array, gathered to one value per chunk."""
        return values[self.chunk_ids]


def tokenize(texts: pa.Array) -> TokenBatch:
    """spaCy-English word tokens of every text.

    Whitespace splitting runs in Arrow; the distinct chunks are found with a hash table, and
    only distinct chunks holding punctuation (or a special case) go through the affix rules."""
    chunk_lists = pc.utf8_split_whitespace(texts)
    chunks = chunk_lists.flatten()
    chunk_offsets = list_offsets(chunk_lists)
    if len(chunks) == 0:
        empty = np.zeros(0, np.int64)
        zeros = np.zeros(len(texts) + 1, np.int64)
        return TokenBatch(pa.array([], pa.string()), empty, zeros, pa.array([], pa.string()), empty, zeros)
    encoded = pc.dictionary_encode(chunks)
    uniq = encoded.dictionary
    cid = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_uniq = len(uniq)
    nonempty = pc.greater(pc.utf8_length(uniq), 0).to_numpy(zero_copy_only=False)
    needs = pc.or_(pc.match_substring_regex(uniq, _NEEDS_AFFIX_RULES), pc.is_in(uniq, value_set=_PLAIN_SPECIALS))
    needs_idx = np.flatnonzero(needs.to_numpy(zero_copy_only=False) & nonempty)
    counts_u = nonempty.astype(np.int64)
    start_u = np.arange(n_uniq, dtype=np.int64)  # where a chunk's tokens start in `combined`
    sub_tokens: list[str] = []
    if len(needs_idx):
        # C-level loops over the distinct chunks (dict lookups, lengths, concatenation): only a
        # chunk seen for the first time in this process goes through the affix rules in Python
        pieces = uniq.take(pa.array(needs_idx)).to_pylist()
        split = list(map(_CACHE.get, pieces))
        if None in split:
            for i in [i for i, toks in enumerate(split) if toks is None]:
                split[i] = _split_cached(pieces[i])
        sub_counts = np.fromiter(map(len, split), np.int64, len(split))
        sub_tokens = list(chain.from_iterable(split))
        counts_u[needs_idx] = sub_counts
        start_u[needs_idx] = n_uniq + np.concatenate([[0], np.cumsum(sub_counts)[:-1]])
    combined = pc.dictionary_encode(pa.concat_arrays([uniq.cast(pa.string()), pa.array(sub_tokens, pa.string())]))
    combined_ids = combined.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    ids, out_offsets = kernels.expand_tokens(cid, counts_u, start_u, combined_ids)
    return TokenBatch(combined.dictionary, ids, out_offsets[chunk_offsets], uniq, cid, chunk_offsets)
