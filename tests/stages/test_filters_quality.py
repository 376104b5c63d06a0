"""Quality rules: one hand-made document per rule, asserting the exact reason; C4 line removal;
the spaCy-compatible tokenizer; real news articles."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages.filters import QualityFilter, words
from stages.filters.quality import QualityConfig

@pytest.fixture(scope="module")
def news_sample() -> list[str]:
    from stages.assets import news_articles

    return [a["text"] for a in news_articles()[:300]]


FAMILIES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")

GOOD = (
    "The committee met on Tuesday to review the proposed budget for the coming year.\n"
    "Several members raised concerns about rising costs in the transport department.\n"
    "After a long debate, they agreed to postpone the final vote until next month.\n"
    "Local residents who attended the meeting asked questions about road repairs.\n"
    "The chair promised that a detailed report would be published before the vote.\n"
    "Observers said that the discussion was calm and that both sides listened carefully."
)


def only(family: str, **params) -> QualityConfig:
    cfg = {f: {"enabled": f == family} for f in FAMILIES}
    cfg[family].update(params)
    return QualityConfig(**cfg)


def run(texts, cfg=None) -> pa.Table:
    stage = QualityFilter(cfg or QualityConfig())
    return stage.process_batch(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}))


def reasons(texts, cfg=None) -> list:
    return run(texts, cfg).column("drop_reason").to_pylist()


def test_good_document_passes_every_rule_and_keeps_its_text():
    out = run([GOOD])
    assert out.column("drop_reason").to_pylist() == [None]
    assert out.column("text").to_pylist() == [GOOD]
    assert out.column("c4_lines_removed").to_pylist() == [0]
    assert out.column("c4_sentences").to_pylist() == [6]
    assert out.column("original_length").to_pylist() == [len(GOOD)]


@pytest.mark.parametrize(
    "text, params, reason",
    [
        ("Only a few words here.", {}, "gopher_short_doc"),
        (GOOD, {"max_doc_words": 20}, "gopher_long_doc"),
        (" ".join(["an ox is in a pen at my inn by the sea"] * 6), {}, "gopher_below_avg_word_length"),
        (" ".join(["incomprehensibilities characteristically"] * 30), {}, "gopher_above_avg_word_length"),
        (GOOD + " #news" * 12, {}, "gopher_too_many_hashes"),
        (GOOD + " and so on..." * 20, {}, "gopher_too_many_ellipsis"),
        ("\n".join(f"- item number {i} of the list with the words to and of" for i in range(20)), {}, "gopher_too_many_bullets"),
        ("\n".join(f"The story continues on page {i} of the paper and then..." for i in range(10)), {"max_symbol_word_ratio": None}, "gopher_too_many_end_ellipsis"),
        (GOOD + " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28", {}, "gopher_below_alpha_threshold"),
        (" ".join(["Apples grow on trees in orchards across many regions"] * 6), {}, "gopher_too_few_stop_words"),
    ],
)
def test_gopher_quality_rules(text, params, reason):
    assert reasons([text], only("gopher_quality", **params)) == [reason]


@pytest.mark.parametrize(
    "text, params, reason",
    [
        ("\n\n".join(["A paragraph that repeats itself."] * 3 + ["Something else entirely here."]), {}, "gopher_dup_para"),
        ("\n\n".join(["Short one.", "Another short one.", "Third.", ("x " * 200).strip(), ("x " * 200).strip()]), {"dup_para_frac": None}, "gopher_dup_para_char"),
        ("\n".join(["Same line again.", "Same line again.", "Same line again.", "Other line.", "Third line."]), {"dup_para_frac": None, "dup_para_char_frac": None}, "gopher_dup_line"),
        (GOOD + "\n" + "\n".join(["Click here to subscribe to our newsletter today and win."] * 4), {"dup_line_frac": None}, "gopher_dup_line_char"),
        ("buy now " * 40, {"dup_line_frac": None}, "gopher_top_2_gram"),
    ],
)
def test_gopher_repetition_rules(text, params, reason):
    assert reasons([text], only("gopher_repetition", **params)) == [reason]


def test_gopher_duplicated_ngrams_rule():
    sentence = "the quick brown fox jumps over the lazy dog near the river bank today"
    text = GOOD.replace("\n", " ") + " " + " and then ".join([sentence] * 5)
    cfg = only("gopher_repetition", top_2_gram_frac=None, top_3_gram_frac=None, top_4_gram_frac=None)
    out = run([text], cfg)
    assert out.column("drop_reason").to_pylist() == ["gopher_dup_5_gram"]
    assert out.column("gopher_dup_5_gram_frac").to_pylist()[0] > 0.15


def test_c4_document_rules():
    cfg = only("c4")
    lorem = GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    curly = GOOD + "\nThe function returns {x: 1} for every input it is given."
    curly_unterminated = GOOD + "\nconfig = {x: 1}"  # the line is removed before the bracket test
    assert reasons([lorem, curly, curly_unterminated, "One. Two. Three. Four."], cfg) == [
        "c4_lorem_ipsum", "c4_curly_bracket", None, "c4_too_few_sentences",
    ]


def test_c4_line_removal_rewrites_text_and_keeps_attributes():
    text = (
        GOOD
        + "\nPlease enable JavaScript to view the comments powered by us."
        + "\nThis site uses cookies to improve your experience of it."
        + "\nShare this"
        + "\nThe city population grew quickly[1] in the last decade.[citation needed]"
    )
    out = run([text], only("c4"))
    assert out.column("drop_reason").to_pylist() == [None]
    assert out.column("text").to_pylist() == [GOOD + "\nThe city population grew quickly in the last decade."]
    assert out.column("c4_lines_removed").to_pylist() == [3]
    assert out.column("original_length").to_pylist() == [len(text)]
    assert out.column("c4_sentences").to_pylist() == [7]


@pytest.mark.parametrize(
    "text, params, reason",
    [
        ("\n".join(f"Heading number {i} without a full stop at the end" for i in range(10)), {}, "fineweb_line_punct_ratio"),
        ("\n".join(["A short line.", "Another one.", "Third line.", "A long line that easily goes over the thirty characters limit."]), {}, "fineweb_short_line_ratio"),
        (GOOD + "\n" + GOOD.split("\n")[0], {}, "fineweb_char_dup_ratio"),
        ("\n".join(f"{w}." for w in "Alpha Beta Gamma Delta Epsilon Zeta Eta Theta".split()), {"short_line_thr": 1.0}, "fineweb_list_ratio"),
    ],
)
def test_fineweb_rules(text, params, reason):
    assert reasons([text], only("fineweb", **params)) == [reason]


def test_rules_are_checked_in_fineweb_order_and_reason_is_the_first_that_fires():
    # 30 distinct words: passes the repetition rules, too short for Gopher quality (first) and
    # without terminal punctuation for C4 (later)
    text = " ".join(f"word{i:02d}x" for i in range(30))
    assert reasons([text]) == ["gopher_short_doc"]
    assert reasons([text], QualityConfig(gopher_quality={"enabled": False})) == ["c4_too_few_sentences"]


def test_disabling_a_rule_with_null():
    text = GOOD + " #news" * 12
    assert reasons([text], only("gopher_quality", max_symbol_word_ratio=None)) == [None]


def test_threshold_change_moves_only_the_decision():
    base = run([GOOD], only("gopher_quality"))
    strict = run([GOOD], only("gopher_quality", min_doc_words=500))
    assert base.column("gopher_words").to_pylist() == strict.column("gopher_words").to_pylist()
    assert (base.column("drop_reason")[0].as_py(), strict.column("drop_reason")[0].as_py()) == (None, "gopher_short_doc")


def test_oversized_document_is_dropped_unscored():
    out = run([GOOD, "word " * 300_000], QualityConfig(max_doc_chars=1_000_000))
    assert out.column("drop_reason").to_pylist() == [None, "quality_doc_too_long"]
    assert out.column("gopher_words").to_pylist()[1] is None


@pytest.mark.parametrize(
    "text, expected",
    [  # spaCy 3.8 English tokens (datatrove's word tokenizer)
        ("Don't do that... U.S. costs $3.5 million (about 20%).",
         ["Do", "n't", "do", "that", "...", "U.S.", "costs", "$", "3.5", "million", "(", "about", "20", "%", ")", "."]),
        ("(R-Wis.) said: 12m. left): ''Frankly,", ["(", "R", "-", "Wis.", ")", "said", ":", "12", "m.", "left", "):", "''", "Frankly", ","]),
        ("well-known e-mail: a@b.com http://x.com/a?b=1 #tag 9/11 O'Neil's",
         ["well", "-", "known", "e", "-", "mail", ":", "a@b.com", "http://x.com/a?b=1", "#", "tag", "9/11", "O'Neil", "'s"]),
        ('Sky"?into way.- /TASS/. cannot gonna', ['Sky"?into', "way.-", "/TASS/.", "can", "not", "gon", "na"]),
    ],
)
def test_tokenizer_matches_spacy(text, expected):
    batch = words.tokenize(pa.array([text]))
    assert batch.tokens.to_pylist() == expected
    assert batch.offsets.tolist() == [0, len(expected)]


def test_real_news_articles(news_sample):
    out = run(news_sample)
    reasons_ = out.column("drop_reason").to_pylist()
    quarantined = out.column("quarantine_reason").to_pylist()
    assert len(reasons_) == len(news_sample)
    assert set(quarantined) <= {None, "empty_text"}
    # news articles are one line each: C4 keeps the line when it ends with terminal punctuation
    for text, reason, q in zip(news_sample, reasons_, quarantined):
        if q is None and reason is None:
            assert text.rstrip().endswith((".", "?", "!", '"', "'"))
    assert out.column("gopher_words").null_count == quarantined.count("empty_text")


@pytest.mark.parametrize("chunk", ["word,", "(word", "word.)", '"word,"', "Calif.", "etc.", "Mr.", "U.S.", "(Wis.)", "a.", "I.", "LORD.",
                                   "cannot,", "gonna!", "e.g.,", "word).", "word,.", "(R", "Don't", "word'", "((word", "word?!)",
                                   "well-known", "well-known,", "(self-evident).", "e-mail", "x-", "-x", "w--w", "a-b-c.", "U.S.-made"])
def test_the_fast_path_of_common_chunks_equals_the_affix_rules(chunk):
    fast = words._split_fast(chunk)
    assert fast is None or fast == words.split_chunk(chunk)


def test_the_fast_path_equals_the_affix_rules_on_every_chunk_of_real_text():
    """Every distinct punctuated chunk of the news articles and Shakespeare's plays: where the fast
    path answers, it answers what the full rules (tested against spaCy above) answer."""
    import pyarrow.compute as pc

    from stages.assets import news_articles, shakespeare_texts

    texts = pa.array([a["text"] for a in news_articles()] + list(shakespeare_texts().values()))
    chunks = pc.unique(pc.utf8_split_whitespace(texts).flatten())
    chunks = chunks.filter(pc.match_substring_regex(chunks, words._NEEDS_AFFIX_RULES)).to_pylist()
    answered = [(c, words._split_fast(c)) for c in chunks]
    answered = [(c, fast) for c, fast in answered if fast is not None]
    assert [c for c, fast in answered if fast != words.split_chunk(c)] == []
    assert len(answered) > 0.4 * len(chunks), (len(answered), len(chunks))  # the fast path is what most chunks take
