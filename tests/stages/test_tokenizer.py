"""train_tokenizer: lossless round trip on the hard cases, seeded sampling, special tokens, loading."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from stages.assets import news_articles
from stages.tokenizer import SpecialTokens, TrainTokenizerConfig, describe, train_bpe

CASES = {
    "newlines": "first line\nsecond line\n\n\nafter three newlines\n",
    "tabs": "col1\tcol2\t\tcol4\n\tindented with a tab",
    "space runs": "a  b   c    d     e" + " " * 17 + "end",
    "leading and trailing": "   leading spaces and trailing   ",
    "crlf": "windows\r\nline\r\nendings\r\n",
    "code": "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n    else:\n\treturn None  # tab\n",
    "non-latin": "Привет, мир! 你好，世界。 こんにちは世界 안녕하세요 مرحبا بالعالم שלום עולם नमस्ते दुनिया",
    "emoji and combining": "🤖👍🏽 e\u0301 \u00e9 \u200b zero-width \ufeff bom",
    "control bytes": "\x00\x01\x7f nul and friends",
    "special token text": "a document that mentions <|eos|> and <|bos|> literally",
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [a["text"] for a in news_articles()[:300]]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    return train_bpe(iter([texts[i : i + 100] for i in range(0, len(texts), 100)]), TrainTokenizerConfig(vocab_size=2000))


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_lossless(tokenizer, name):
    text = CASES[name]
    tokenizer.encode_special_tokens = True  # what the tokenize stage does: document text is never a control token
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    tokenizer.encode_special_tokens = False


def test_round_trip_on_real_code_and_prose(tokenizer):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[40:60]] + [a["text"] for a in news_articles()[300:400]]
    encoded = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    for text, enc in zip(texts, encoded):
        assert tokenizer.decode(enc.ids, skip_special_tokens=False) == text


def test_special_tokens_first_and_not_produced_by_text(tokenizer):
    info = describe(tokenizer, SpecialTokens())
    assert (info["bos_id"], info["eos_id"], info["pad_id"]) == (0, 1, 2)
    assert info["vocab_size"] == 2000
    tokenizer.encode_special_tokens = True
    ids = tokenizer.encode(CASES["special token text"], add_special_tokens=False).ids
    tokenizer.encode_special_tokens = False
    assert not {0, 1, 2} & set(ids)


def test_custom_special_tokens():
    cfg = TrainTokenizerConfig(vocab_size=400, special_tokens=SpecialTokens(bos="<s>", eos="</s>", pad="<pad>"))
    tok = train_bpe(iter([["hello world " * 50, "more text here"]]), cfg)
    info = describe(tok, cfg.special_tokens)
    assert tok.id_to_token(info["eos_id"]) == "</s>" and tok.id_to_token(info["pad_id"]) == "<pad>"


def test_config_rejects_duplicate_special_tokens():
    with pytest.raises(ValueError, match="must differ"):
        TrainTokenizerConfig(special_tokens=SpecialTokens(bos="x", eos="x"))
