"""Language ID, toxicity and PII stages on hand-built tables, and bad input for every filter."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.stage import DROP_REASON, QUARANTINE_REASON
from stages.filters import STAGES, LanguageFilter, PiiMasker, QualityFilter, ToxicityFilter
from stages.filters.pii import is_card, luhn_ok


def table(texts, **cols) -> pa.Table:
    return pa.table({"id": [str(i) for i in range(len(texts))], "text": pa.array(texts, pa.string()), **cols})


# -- language ID ---------------------------------------------------------------------------
SENTENCES = {
    "en": "The government announced new measures to support small businesses during the winter months.",
    "de": "Die Regierung hat neue Maßnahmen angekündigt, um kleine Unternehmen im Winter zu unterstützen.",
    "fr": "Le gouvernement a annoncé de nouvelles mesures pour soutenir les petites entreprises pendant l'hiver.",
    "es": "El gobierno anunció nuevas medidas para apoyar a las pequeñas empresas durante los meses de invierno.",
    "ru": "Правительство объявило о новых мерах поддержки малого бизнеса в зимние месяцы.",
    "zh": "政府宣布了在冬季几个月支持小企业的新措施。",
}


def test_language_filter_identifies_and_keeps_configured_languages():
    stage = LanguageFilter(LanguageFilter.Config(languages=["en", "de"]))
    stage.setup()
    out = stage.process_batch(table(list(SENTENCES.values()) + ["12345 !!! ???"]))
    assert out.column("lang").to_pylist() == list(SENTENCES) + [None]
    assert out.column(DROP_REASON).to_pylist() == [None, None, "lang_not_allowed", "lang_not_allowed", "lang_not_allowed", "lang_not_allowed", "lang_unknown"]
    assert all(0.5 <= s <= 1 for s in out.column("lang_score").to_pylist()[:6])


def test_language_filter_min_score_on_mixed_text():
    mixed = SENTENCES["en"] + " " + SENTENCES["de"] + " " + SENTENCES["fr"]
    out = LanguageFilter(LanguageFilter.Config(languages=None, min_score=0.9)).process_batch(table([mixed]))
    assert out.column(DROP_REASON).to_pylist() == ["lang_low_score"]
    assert out.column("lang_score").to_pylist()[0] < 0.9


# -- toxicity --------------------------------------------------------------------------------
def test_toxicity_word_boundaries_and_ratio():
    texts = [
        "What the fuck is this, you asshole!",
        "Scunthorpe assessment: a classic passage about cocktails.",  # substrings only: kept
        "He said 2 girls 1 cup was trending.",  # multi-word entry
        "Nothing to see here at all.",
    ]
    out = ToxicityFilter(ToxicityFilter.Config()).process_batch(table(texts))
    assert out.column(DROP_REASON).to_pylist() == ["toxic_ldnoobw", None, "toxic_ldnoobw", None]
    assert out.column("toxic_word_count").to_pylist() == [2, 0, 1, 0]
    assert out.column("toxic_word_ratio").to_pylist()[0] == pytest.approx(2 / 7)  # 7 words


def test_toxicity_per_language_and_soft_threshold():
    texts = ["Das ist wirklich Scheiße, sagte er.", "Das ist wirklich Scheiße, sagte er.", "這是正常的性別研究文本"]
    cfg = ToxicityFilter.Config(drop_on_match=False, max_word_ratio=0.1)
    out = ToxicityFilter(cfg).process_batch(table(texts, lang=["de", "en", "zh"]))
    assert out.column("toxic_list").to_pylist() == ["de", "en", "zh"]
    assert out.column("toxic_word_count").to_pylist() == [1, 0, 0]  # the English list has no German words; 性 is allow-listed
    assert out.column(DROP_REASON).to_pylist() == ["toxic_word_ratio", None, None]


# -- PII -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, masked",
    [
        ("Mail john.doe@example.com or call (555) 123-4567 today.", "Mail |||EMAIL_ADDRESS||| or call |||PHONE_NUMBER||| today."),
        ("Email: first.last+tag@sub.domain.org, or <x@y.io>.", "Email: |||EMAIL_ADDRESS|||, or <|||EMAIL_ADDRESS|||>."),
        ("Server at 192.168.1.10:8080 and 2001:db8::ff00:42:8329.", "Server at |||IP_ADDRESS|||:8080 and |||IP_ADDRESS|||."),
        ("Card 4111 1111 1111 1111, not 4111 1111 1111 1112.", "Card |||CREDIT_CARD|||, not 4111 1111 1111 1112."),
        ("Call +44 20 7946 0958 or +1 555.123.4567.", "Call |||PHONE_NUMBER||| or |||PHONE_NUMBER|||."),
    ],
)
def test_pii_masks_with_typed_placeholders(text, masked):
    out = PiiMasker(PiiMasker.Config()).process_batch(table([text]))
    assert out.column("text").to_pylist() == [masked]


@pytest.mark.parametrize(
    "text",
    [
        "Version 1.2.3.4 and v10.0.0.1 were released; Python 3.11.4 too.",
        "Dates 12.05.2021, 2017-05-12, 1999-2000 and 05/12/2021 at 12:30:45.",
        "See https://user@example.com/path and https://medium.com/@someone/post and icon@2x.png.",
        "ISBN 978-3-16-148410-0, pi 3.14159265358979, 1,234,567,890 people, order 1234567890123.",
        "C++ std::vector, Rust a::b, the IPv6 loopback is written ::1 sometimes.",
    ],
)
def test_pii_leaves_lookalikes_untouched(text):
    out = PiiMasker(PiiMasker.Config()).process_batch(table([text]))
    assert out.column("text").to_pylist() == [text]
    assert sum(out.column(f"pii_{k}_count")[0].as_py() for k in ("email", "phone", "ip", "credit_card")) == 0


def test_pii_counts_and_optional_drop():
    text = "a@b.com c@d.org 10.0.0.1 (555) 123-4567"
    out = PiiMasker(PiiMasker.Config(max_pii_spans=3)).process_batch(table([text, "nothing here"]))
    assert [out.column(f"pii_{k}_count").to_pylist() for k in ("email", "ip", "phone")] == [[2, 0], [1, 0], [1, 0]]
    assert out.column(DROP_REASON).to_pylist() == ["pii_too_many_spans", None]


def test_luhn_and_card_shapes():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert is_card("3782 822463 10005")  # Amex 4-6-5
    assert not is_card("4111 1111-1111 1111")  # mixed separators
    assert not is_card("1234567812345670")  # Luhn-valid, no issuer prefix


# -- bad input, every stage ----------------------------------------------------------------
def bad_batch() -> pa.Table:
    ok = "The committee met on Tuesday to review the proposed budget. " * 20
    invalid = pa.array([b"\xed\xa0\x80 lone surrogate"], pa.binary()).cast(pa.string(), safe=False)
    texts = pa.concat_arrays([
        pa.array([ok, "", "   \n ", None, "!!! ... ??? ---", "nul\x00byte " * 5, "English текст 中文 العربية mixed. " * 30, "word " * 2_200_000], pa.string()),
        invalid,
    ])
    return pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})


@pytest.mark.parametrize("stage_cls", STAGES, ids=lambda c: c.name)
def test_bad_input_gets_a_decision_or_a_quarantine_reason(stage_cls):
    stage = stage_cls(stage_cls.Config())
    stage.setup()
    batch = bad_batch()
    out = stage.process_batch(batch)
    assert out.num_rows == batch.num_rows
    assert out.column("id").to_pylist() == batch.column("id").to_pylist()
    assert out.column(QUARANTINE_REASON).to_pylist() == [None, "empty_text", "empty_text", "missing_text", None, "nul_bytes", None, None, "invalid_utf8"]
    reasons = out.column(DROP_REASON).to_pylist()
    assert all(r is None for r, q in zip(reasons, out.column(QUARANTINE_REASON).to_pylist()) if q)
    if stage_cls is QualityFilter:
        assert reasons[4] == "gopher_top_2_gram"  # all punctuation: repetition runs first, as in FineWeb
        assert reasons[7] == "quality_doc_too_long"  # 11 MB, dropped unscored
    if stage_cls is LanguageFilter:
        assert reasons[4] == "lang_unknown"


def test_empty_batch():
    for stage_cls in STAGES:
        out = stage_cls(stage_cls.Config()).process_batch(table([]))
        assert out.num_rows == 0 and DROP_REASON in out.column_names
