"""train_tokenizer: lossless round trip on the hard cases, the bounded seeded sample, special tokens, loading."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from stages.assets import news_articles
from stages.train_tokenizer.stage import SpecialTokens, TrainTokenizerConfig, describe, train_bpe

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


def test_sample_is_bounded_and_chosen_by_the_ids_hash(tmp_path):
    """The stage trains on at most sample_chars characters (about that many), streamed from the
    per-file sample tasks: exactly the documents whose keyed hash falls in the kept bins."""
    from pipeline.config import load_config
    from pipeline.io import read_table
    from pipeline.runner import Runner
    from pipeline.stage import stage_seed
    from pipeline.storage import Storage
    from stages.train_tokenizer.stage import OVERSAMPLE, SAMPLE_BINS, sample_bin

    arts = [a["text"] for a in news_articles()[:400] if a["text"]]
    data = tmp_path / "data"
    data.mkdir()
    for k in range(3):
        (data / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in arts[k::3]))
    (tmp_path / "p.yaml").write_text(f"""
name: tok-sample
work_dir: {tmp_path / "work"}
seed: 7
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: news, paths: ["{data}/*.jsonl"]}}]}}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [ingest]
    config: {{vocab_size: 400, sample_chars: 150000}}
""")
    report = Runner(load_config(str(tmp_path / "p.yaml")), use_ray=False, track=False).run()
    info = report.stage("train_tokenizer").manifest["summary"]["data"]
    assert 0.8 * 150_000 <= info["trained_on_chars"] <= 150_000
    ingest = report.stage("ingest")
    docs = read_table(Storage(), [str(Path(ingest.stage_dir) / f["path"]) for f in ingest.manifest["datasets"]["data"]["files"]]).to_pylist()
    fraction = OVERSAMPLE * 150_000 / sum(len(d["text"]) for d in docs)
    cut = round(info["sample_fraction"] / fraction * SAMPLE_BINS)
    seed = stage_seed(7, "train_tokenizer")
    chosen = [d for d in docs if 0 <= sample_bin(d["id"], seed, fraction) < cut]
    assert info["trained_on_docs"] == len(chosen) and info["trained_on_chars"] == sum(len(d["text"]) for d in chosen)
    assert not list((Path(report.stage("train_tokenizer").stage_dir)).glob("*/_work"))  # the sample files are gone


def test_cutoff_keeps_whole_bins_within_the_bound():
    from stages.train_tokenizer.stage import cutoff_bin

    assert cutoff_bin(np.array([10, 10, 10, 10]), 25) == 2
    assert cutoff_bin(np.array([10, 10, 10, 10]), 40) == 4
    assert cutoff_bin(np.array([50, 10]), 25) == 1  # the first bin alone is over the bound: it is the sample
