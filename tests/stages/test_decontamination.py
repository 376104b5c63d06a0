"""Decontamination on real text: MMLU questions planted in real articles are found (and redacted
the GPT-3 way), clean real text is not flagged, too-common n-grams are ignored; the task format."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from stages.assets import news_articles, python_doc_topics
from stages.decontaminate.stage import (CONTAMINATED, CONTAMINATED_FULLY_REDACTED, CONTAMINATED_SPLIT, Decontaminate,
                                  DecontaminateConfig, redact)
from stages.decontaminate.ngrams import NgramIndex
from stages.evalsets import Example, Task, TaskFormatError, load_mmlu, load_task, parse_task_jsonl, task_to_jsonl


@pytest.fixture(scope="module")
def mmlu() -> Task:
    return load_mmlu()


@pytest.fixture(scope="module")
def index(mmlu) -> NgramIndex:
    return NgramIndex.build([mmlu])


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return [a["text"] for a in news_articles() if len(a["text"]) > 1500]


def stage(**kw) -> Decontaminate:
    return Decontaminate(DecontaminateConfig(tasks=["mmlu"], **kw))


def batch(texts: list[str]) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts, "source": ["news"] * len(texts)})


def planted(mmlu: Task, count: int) -> list[Example]:
    """Long questions from different subjects (not the templated moral scenarios)."""
    seen, out = set(), []
    for e in mmlu.examples:
        subject = e.metadata["subject"]
        if len(e.context.split()) >= 20 and subject not in seen and subject != "moral scenarios":
            seen.add(subject)
            out.append(e)
        if len(out) == count:
            return out
    return out


def test_mmlu_loader_drops_the_header_rows(mmlu):
    assert len(mmlu.examples) == 14042
    assert len({e.id for e in mmlu.examples}) == 14042
    assert all(len(e.choices) == 4 and e.gold in range(4) for e in mmlu.examples)
    assert not any(e.context == "question" for e in mmlu.examples)
    assert len({e.metadata["subject"] for e in mmlu.examples}) == 57


def test_planted_questions_are_found_with_their_ids(mmlu, index, articles):
    exs = planted(mmlu, 10)
    texts = []
    for k, ex in enumerate(exs):
        art = articles[k]
        cut = art.find(". ", len(art) // 2) + 2
        # as a web page would quote it: different case, punctuation lost, the choices after it
        quoted = ex.context.upper().replace(",", "").replace("?", " ?") if k % 2 else ex.context
        texts.append(art[:cut] + quoted + " " + " ".join(ex.choices) + " " + art[cut:])
    texts += articles[50:90]  # clean
    out = stage().check_batch(batch(texts), index)
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[:10] == [CONTAMINATED] * 10
    assert reasons[10:] == [None] * 40
    for ex, found in zip(exs, out.column("contaminated_examples").to_pylist()[:10]):
        assert f"mmlu:{ex.id}" in found
    assert out.column("contaminated_tasks").to_pylist()[0] == ["mmlu"]
    assert all(n >= len(ex.context) * 0.8 for ex, n in zip(exs, out.column("contaminated_chars").to_pylist()[:10]))


def test_clean_real_text_is_not_flagged(index):
    texts = [a["text"] for a in news_articles()] + list(python_doc_topics().values())
    out = stage().check_batch(batch(texts), index)
    flagged = out.filter(pc.is_valid(out.column("drop_reason")))
    assert flagged.num_rows == 0, flagged.select(["contaminated_examples"]).to_pylist()


def test_gpt3_redaction_removes_span_and_margin(mmlu, index, articles):
    ex = planted(mmlu, 1)[0]
    before, after = articles[0][:1200], articles[1][:1200]
    text = before + " " + ex.context + " " + after
    out = stage(mode="redact").check_batch(batch([text]), index)
    assert out.column("drop_reason").to_pylist() == [None]  # kept, redacted
    red = out.column("text").to_pylist()[0]
    assert ex.context not in red
    start = len(before) + 1
    # GPT-3 rule: the matched span (start of first to end of last matching word) +- 200 characters
    assert red == before[: start - 200] + "\n\n" + text[start + len(ex.context) + 200 :]
    assert out.column("redacted_chars").to_pylist()[0] == len(text) - len(red)


def test_redaction_drops_short_fragments_and_many_splits(mmlu, index, articles):
    ex = planted(mmlu, 1)[0]
    # too little text around the question: nothing of 200+ characters survives
    out = stage(mode="redact").check_batch(batch(["Short intro. " + ex.context + " Short outro."]), index)
    assert out.column("drop_reason").to_pylist() == [CONTAMINATED_FULLY_REDACTED]
    # the question eleven times, 500 clean characters apart: split more than 10 times
    text = articles[2][:500]
    for _ in range(11):
        text += " " + ex.context + " " + articles[3][:500]
    out = stage(mode="redact").check_batch(batch([text]), index)
    assert out.column("drop_reason").to_pylist() == [CONTAMINATED_SPLIT]
    assert stage(mode="redact", max_splits=20).check_batch(batch([text]), index).column("drop_reason").to_pylist() == [None]


def test_redact_helper():
    text = "a" * 300 + "MATCH" + "b" * 300
    pieces, cuts = redact(text, [(300, 305)], 200, 200)
    assert cuts == 1 and pieces == []  # both fragments are 100 characters
    pieces, cuts = redact(text, [(300, 305)], 50, 200)
    assert pieces == ["a" * 250, "b" * 250]


def test_ngrams_shared_by_many_examples_are_ignored(mmlu, index):
    # the moral-scenarios template opens ~900 questions: quoting it is not contamination
    template = mmlu.examples[0].context.split("?")[0] + "?"
    assert len(template.split()) > 20
    assert Decontaminate.match_document("Lorem ipsum. " + template + " Dolor sit amet.", index) is None
    assert index.stats["ngrams_ignored_too_common"] > 0
    loose = NgramIndex.build([mmlu], max_examples_per_ngram=10_000)
    assert Decontaminate.match_document("Lorem ipsum. " + template + " Dolor sit amet.", loose) is not None


def test_index_is_compact_and_survives_save_load(index, tmp_path):
    from pipeline.storage import Storage

    assert index.stats["tasks"]["mmlu"]["examples_indexed"] > 12000
    assert index.nbytes < 32 * 1024 * 1024
    index.save(Storage(), str(tmp_path / "idx"))
    again = NgramIndex.load(Storage(), str(tmp_path / "idx"))
    assert (again.hashes == index.hashes).all() and again.lengths == index.lengths and again.examples == index.examples


def test_short_n_and_custom_task_file(tmp_path):
    task = Task("tiny", (Example("q1", "The quick brown fox jumps over the lazy dog near the river bank today", ("yes", "no"), 0),))
    path = tmp_path / "tiny.jsonl"
    path.write_text(task_to_jsonl(task))
    loaded = load_task({"name": "tiny", "path": str(path)})
    assert loaded.examples == task.examples
    idx = NgramIndex.build([loaded], n=5, min_words=None)
    assert Decontaminate.match_document("we saw: the QUICK brown fox, jumps over it", idx)[1] == [0]
    assert Decontaminate.match_document("the quick brown fox sleeps", idx) is None


@pytest.fixture(scope="module")
def paragraph_index(mmlu) -> NgramIndex:
    return NgramIndex.build_paragraphs([mmlu])


def test_paragraph_mode_finds_copied_paragraphs_only_whole(mmlu, paragraph_index, articles):
    """Dolma's rule: a training line whose normalised words equal an evaluation paragraph's is a
    match (case and punctuation aside); part of a paragraph, or a paragraph inside a longer line,
    is not -- while the 13-gram rule flags both."""
    exs = planted(mmlu, 6)
    texts = []
    for k, ex in enumerate(exs):
        art = articles[k]
        quoted = ex.context.upper().replace(",", " ,") if k % 2 else ex.context
        texts.append(art[:800] + "\n" + quoted + "\n" + art[800:1600])
    partial = articles[10][:800] + "\n" + " ".join(exs[0].context.split()[:-3]) + "\n" + articles[10][800:1600]
    inline = articles[11][:800] + " " + exs[1].context + " " + articles[11][800:1600]  # no line break around it
    clean = [a["text"] for a in news_articles()[:1500]] + list(python_doc_topics().values())
    paragraph = Decontaminate(DecontaminateConfig(tasks=["mmlu"], match="paragraph"))
    out = paragraph.check_batch(batch(texts + [partial, inline] + clean), paragraph_index)
    reasons = out.column("drop_reason").to_pylist()
    assert reasons[:6] == [CONTAMINATED] * 6
    assert reasons[6:] == [None] * (len(reasons) - 6)  # partial, inline and all the clean real text
    for k, (ex, found) in enumerate(zip(exs, out.column("contaminated_examples").to_pylist()[:6])):
        assert found == [f"mmlu:{ex.id}"]
        line_start = texts[k].index("\n") + 1
        assert out.column("contaminated_chars").to_pylist()[k] == texts[k].index("\n", line_start) - line_start
    ngram = stage().check_batch(batch([partial, inline]), NgramIndex.build([mmlu]))
    assert ngram.column("drop_reason").to_pylist() == [CONTAMINATED, CONTAMINATED]
    # redact mode removes the matched line (with the margin)
    red = Decontaminate(DecontaminateConfig(tasks=["mmlu"], match="paragraph", mode="redact", redact_margin=0, min_fragment_chars=50))
    text = red.check_batch(batch(texts[:1]), paragraph_index).column("text").to_pylist()[0]
    assert exs[0].context not in text and articles[0][:800] in text


def test_paragraph_index_counts_and_survives_save_load(paragraph_index, tmp_path):
    from pipeline.storage import Storage

    stats = paragraph_index.stats
    assert stats["kind"] == "paragraph" and stats["min_words"] == 13 and 0 < stats["paragraphs_indexed"] < stats["paragraphs"]
    paragraph_index.save(Storage(), str(tmp_path / "pidx"))
    again = NgramIndex.load(Storage(), str(tmp_path / "pidx"))
    assert again.kind == "paragraph" and again.n == 13 and (again.hashes == paragraph_index.hashes).all()


def test_task_format_errors():
    with pytest.raises(TaskFormatError, match="gold"):
        parse_task_jsonl("t", [json.dumps({"id": 1, "context": "c", "choices": ["a"], "gold": 3})], "t.jsonl")
    with pytest.raises(TaskFormatError, match="duplicate"):
        parse_task_jsonl("t", [json.dumps({"id": 1, "question": "c"})] * 2, "t.jsonl")
    with pytest.raises(TaskFormatError, match=r"^t\.jsonl:3: invalid JSON"):  # blank lines still count
        parse_task_jsonl("t", [json.dumps({"id": 1, "question": "c"}), "", "{not json"], "t.jsonl")
    t = parse_task_jsonl("t", [json.dumps({"id": "a", "question": "q?", "choices": ["x", "y"], "gold": 1}),
                               json.dumps({"id": "b", "context": "shot", "choices": ["x"], "gold": 0, "split": "fewshot"})])
    assert [e.id for e in t.examples] == ["a"] and [e.id for e in t.fewshot] == ["b"]
