"""lm-evaluation-harness task files, run as they are: a YAML (or a folder of them) whose data is
in local or ``s3://`` JSON / JSON Lines / Parquet files.

What a task file may say, with lm-eval's meaning (``lm_eval.api.task.ConfigurableTask``):

* data: ``dataset_path: json`` or ``parquet`` with ``dataset_kwargs: {data_files: ...}`` (a file,
  a list, or ``{split: file(s)}``; a relative path is relative to the YAML's folder);
  ``test_split`` / ``validation_split`` / ``training_split`` / ``fewshot_split``; ``include``
  (another YAML of the same folder, merged under this one);
* prompts: ``doc_to_text``, ``doc_to_target``, ``doc_to_choice`` (a field name, a Jinja template,
  a list or a mapping), ``description``, ``target_delimiter``, ``fewshot_delimiter``,
  ``num_fewshot``, ``fewshot_config`` (``sampler: default | first_n``, ``split``, ``samples``,
  ``fewshot_indices``, and per-shot ``doc_to_*`` / delimiters);
* ``output_type``: ``multiple_choice`` (also "partial evaluation", Winogrande's several contexts
  and one continuation, when ``doc_to_text`` gives the gold index), ``loglikelihood``,
  ``loglikelihood_rolling``, ``generate_until`` (``generation_kwargs``: ``until``,
  ``max_gen_toks``, greedy only);
* ``metric_list`` and ``filter_list`` (:mod:`stages.evaluate.lmeval_metrics`).

Templates are rendered by a Jinja environment configured as lm-eval's (``StrictUndefined``,
trailing newlines kept, the ``regex_replace`` filter) but sandboxed: a task file is data, and a
template can call a string's methods but never reach Python's internals.

Refused when the file is read, by name (``file: key: why``): Python code (``!function``,
``process_docs``, ``process_results``, ``custom_dataset``, ``class``), hub datasets (any other
``dataset_path``), groups, multimodal fields, promptsource prompts, sampling and repeats, and any
key lm-eval itself does not know. Per document, a template that fails, a gold index out of range,
an empty prompt to generate from or an unreadable line is quarantined with its reason
(``file:line`` or ``file#index``) and counted; the rest of the task runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import jinja2
import jinja2.sandbox
import yaml

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's simple_evaluate(fewshot_random_seed=1234)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default

SUPPORTED_KEYS = {
    "task", "task_alias", "tag", "include", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
    "validation_split", "test_split", "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
    "target_delimiter", "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list", "output_type",
    "generation_kwargs", "repeats", "filter_list", "should_decontaminate", "doc_to_decontamination_query", "metadata",
}
REFUSED_KEYS = {
    "process_docs": "a Python function over the documents: lmpipe runs no task code",
    "process_results": "a Python scoring function: lmpipe runs no task code",
    "custom_dataset": "a Python dataset builder: lmpipe runs no task code",
    "class": "a Python task class: lmpipe runs no task code",
    "group": "a group of tasks: list the task files (or their folder) instead",
    "doc_to_image": "multimodal tasks are not supported",
    "doc_to_audio": "multimodal tasks are not supported",
    "use_prompt": "promptsource prompts are not supported: write the template in doc_to_text",
    "unsafe_code": "tasks that execute generated code are not supported",
    "gen_prefix": "gen_prefix is not supported",
}
FEWSHOT_KEYS = {"sampler", "split", "samples", "fewshot_indices", "doc_to_text", "doc_to_choice", "doc_to_target",
                "fewshot_delimiter", "target_delimiter"}
GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}
DATA_FORMATS = {"json": "json", "parquet": "parquet"}


class TaskFileError(ValueError):
    """A task file lmpipe cannot run; the message names the file (and line) and the key."""


@dataclass(frozen=True)
class FunctionRef:
    """What ``!function module.name`` becomes: recorded so that it can be refused by name."""

    target: str


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(str(loader.construct_scalar(node))))


# -- Jinja, as lm-eval renders (lm_eval.utils.apply_template) -------------------------------------------------

def regex_replace(string, pattern, repl, count: int = 0):
    return re.sub(pattern, repl, string, count=count)


_JINJA = jinja2.sandbox.SandboxedEnvironment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_JINJA.filters["regex_replace"] = regex_replace
_TEMPLATES: dict[str, jinja2.Template] = {}


def apply_template(template: str, doc: dict) -> str:
    compiled = _TEMPLATES.get(template)
    if compiled is None:
        compiled = _TEMPLATES[template] = _JINJA.from_string(template)
    return compiled.render(**doc)


# -- reading and validating a task file ---------------------------------------------------------------------

def _line_of(text: str, key: str) -> Optional[int]:
    m = re.search(rf"^\s*{re.escape(key)}\s*:", text, flags=re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _where(path: str, text: str, key: str) -> str:
    line = _line_of(text, key.split(".")[0].split("[")[0])
    return f"{path}:{line}" if line else path


def _find_functions(value: Any, key: str) -> Optional[tuple[str, str]]:
    if isinstance(value, FunctionRef):
        return key, value.target
    if isinstance(value, dict):
        for k, v in value.items():
            found = _find_functions(v, f"{key}.{k}")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_functions(v, f"{key}[{i}]")
            if found:
                return found
    return None


def _read_yaml(path: str, storage) -> tuple[dict, str, bytes]:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such task file") from None
    text = data.decode("utf-8")
    try:
        raw = yaml.load(text, Loader=_TaskLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise TaskFileError(f"{where}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise TaskFileError(f"{path}: a task file is a mapping of keys, got {type(raw).__name__}")
    return raw, text, data


def _merged(path: str, storage, depth: int = 0) -> tuple[dict, str, list[tuple[str, bytes]]]:
    """The file's keys over those of the files it ``include``s (lm-eval's shallow merge)."""
    from pipeline import storage as st

    if depth > 8:
        raise TaskFileError(f"{path}: include: nested more than 8 deep (a cycle?)")
    raw, text, data = _read_yaml(path, storage)
    files = [(path, data)]
    includes = raw.pop("include", None)
    if includes is None:
        return raw, text, files
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else list(includes):
        if not isinstance(inc, str):
            raise TaskFileError(f"{_where(path, text, 'include')}: include: expected a file name, got {inc!r}")
        inc_path = inc if os.path.isabs(inc) or st.is_remote(inc) else st.join(_parent(path), inc)
        sub, _, sub_files = _merged(inc_path, storage, depth + 1)
        merged.update(sub)
        files += sub_files
    merged.update(raw)
    return merged, text, files


def _parent(path: str) -> str:
    from pipeline import storage as st

    return path.rsplit("/", 1)[0] if st.is_remote(path) else os.path.dirname(os.path.abspath(path))


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class FilterSpec:
    name: str
    steps: tuple[tuple[str, dict[str, Any]], ...]


@dataclass(frozen=True)
class TaskFile:
    """A validated task file: lm-eval's keys with their defaults filled in."""

    name: str
    path: str
    digest: str  # sha256 over the task file and every file it includes
    output_type: str
    data_format: str
    data_files: dict[str, tuple[str, ...]]  # split -> files
    test_split: Optional[str]
    validation_split: Optional[str]
    training_split: Optional[str]
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any
    description: str
    target_delimiter: str
    fewshot_delimiter: str
    fewshot: dict[str, Any]  # lm-eval's FewshotConfig, resolved
    num_fewshot: Optional[int]
    metrics: tuple[MetricSpec, ...]
    filters: tuple[FilterSpec, ...]
    until: tuple[str, ...] = ()
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    files: tuple[str, ...] = ()  # the YAML files read

    @property
    def eval_split(self) -> str:
        return self.test_split if self.test_split is not None else self.validation_split  # type: ignore[return-value]


def bundled_task_file(name: str) -> str:
    """The YAML of one of lm-eval's own tasks (``arc_easy``), from the installed lm-eval package."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskFileError(f"task {name!r}: lm-eval's bundled tasks need lm-eval installed (pip install 'lmpipe[eval]'), or give the YAML's path")
    root = os.path.join(list(spec.submodule_search_locations)[0], "tasks")
    pattern = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.MULTILINE)
    for folder, _, names in sorted(os.walk(root)):
        for n in sorted(names):
            if n.endswith(".yaml"):
                f = os.path.join(folder, n)
                with open(f, encoding="utf-8", errors="replace") as fh:
                    if pattern.search(fh.read()):
                        return f
    raise TaskFileError(f"task {name!r}: not one of the installed lm-eval's tasks")


def load_task_file(path: str, storage=None, data_files: Optional[dict] = None) -> TaskFile:
    """Read and validate one task YAML; every refusal is a one-line :class:`TaskFileError`.
    ``data_files`` ({split: file(s)}) replaces the file's dataset: a hub task (lm-eval's bundled
    ``arc_easy``) then reads local or s3:// copies of its data, and the splits not given are unset."""
    from stages.evaluate import lmeval_metrics

    if storage is None:
        from pipeline import storage as st

        storage = st.Storage()
    raw, text, files = _merged(path, storage)
    if data_files is not None:
        first = next(iter(data_files.values()), "")
        first = first[0] if isinstance(first, list) and first else first
        raw["dataset_path"] = "parquet" if str(first).endswith(".parquet") else "json"
        raw.pop("dataset_name", None)
        raw["dataset_kwargs"] = {"data_files": dict(data_files)}
        for key in ("test_split", "validation_split", "training_split", "fewshot_split"):
            if raw.get(key) is not None and raw[key] not in data_files:
                raw.pop(key)

    def fail(key: str, why: str):
        raise TaskFileError(f"{_where(path, text, key)}: {key}: {why}")

    for key in raw:
        if key in REFUSED_KEYS:
            fail(key, REFUSED_KEYS[key])
        if key not in SUPPORTED_KEYS:
            fail(key, "unknown key (not one of lm-eval's task options)")
    found = _find_functions(raw, "")
    if found:
        fail(found[0].lstrip("."), f"!function {found[1]} is Python code: lmpipe runs no task code")
    name = raw.get("task")
    if not isinstance(name, str) or not name:
        fail("task", "a task file needs a task name (a list of tasks is a group: give the task files instead)")
    output_type = raw.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        fail("output_type", f"{output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if raw.get("repeats", 1) != 1:
        fail("repeats", "only 1 (greedy decoding, no sampling)")

    fmt = DATA_FORMATS.get(raw.get("dataset_path"))
    if fmt is None:
        fail("dataset_path", f"{raw.get('dataset_path')!r} would be read from a hub: lmpipe reads local or s3:// files"
                             " (dataset_path: json or parquet, with dataset_kwargs.data_files)")
    if raw.get("dataset_name") is not None:
        fail("dataset_name", "a hub dataset's configuration: not used with local files")
    kwargs = raw.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        fail("dataset_kwargs", "needs data_files (a file, a list of files, or {split: files})")
    for k in kwargs:
        if k != "data_files":
            fail(f"dataset_kwargs.{k}", "not supported (only data_files)")
    data_files = _data_files(kwargs["data_files"], _parent(path), lambda why: fail("dataset_kwargs.data_files", why))
    splits = {k: raw.get(k) for k in ("test_split", "validation_split", "training_split", "fewshot_split")}
    for key, split in splits.items():
        if split is not None and split not in data_files:
            fail(key, f"split {split!r} has no data_files (have: {', '.join(sorted(data_files))})")
    if splits["test_split"] is None and splits["validation_split"] is None:
        fail("test_split", "a task needs test_split or validation_split: the documents it is scored on")

    fewshot_cfg = raw.get("fewshot_config") or {}
    if not isinstance(fewshot_cfg, dict):
        fail("fewshot_config", "expected a mapping")
    for k in fewshot_cfg:
        if k not in FEWSHOT_KEYS:
            fail(f"fewshot_config.{k}", "not supported" if k in ("process_docs", "gen_prefix") else "unknown key")
    sampler = fewshot_cfg.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        fail("fewshot_config.sampler", f"{sampler!r}: lm-eval's samplers are default and first_n")
    fewshot = {  # FewshotConfig.from_dict: the task's keys, overridden by fewshot_config's
        "split": splits["fewshot_split"], "fewshot_delimiter": raw.get("fewshot_delimiter", "\n\n"),
        "target_delimiter": raw.get("target_delimiter", " "), "doc_to_text": raw.get("doc_to_text"),
        "doc_to_choice": raw.get("doc_to_choice"), "doc_to_target": raw.get("doc_to_target"), **fewshot_cfg, "sampler": sampler,
    }
    if fewshot["split"] is not None and fewshot["split"] not in data_files:
        fail("fewshot_config.split", f"split {fewshot['split']!r} has no data_files")
    if fewshot.get("samples") is not None and not (isinstance(fewshot["samples"], list) and all(isinstance(s, dict) for s in fewshot["samples"])):
        fail("fewshot_config.samples", "expected a list of documents")

    num_fewshot = raw.get("num_fewshot")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        fail("num_fewshot", "expected a non-negative integer")
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        value = raw.get(key)
        if value is not None and not isinstance(value, (str, int, list, dict)):
            fail(key, f"expected a field name, a template, a list or a mapping, got {type(value).__name__}")
    if output_type == "multiple_choice" and raw.get("doc_to_choice") is None:
        fail("doc_to_choice", "multiple_choice needs the choices")
    for key in ("description", "target_delimiter", "fewshot_delimiter"):
        if key in raw and not isinstance(raw[key], str):
            fail(key, "expected a string")

    until: tuple[str, ...] = ()
    max_gen_toks = DEFAULT_MAX_GEN_TOKS
    gen = raw.get("generation_kwargs")
    if output_type == "generate_until":
        gen = dict(gen or {})
        for k in gen:
            if k not in GENERATION_KEYS:
                fail(f"generation_kwargs.{k}", "not supported (greedy decoding: until, max_gen_toks)")
        if gen.get("do_sample") or float(gen.get("temperature", 0.0) or 0.0) != 0.0:
            fail("generation_kwargs", "only greedy decoding (do_sample: false, temperature: 0)")
        raw_until = gen.get("until", [raw.get("fewshot_delimiter", "\n\n")])
        raw_until = [raw_until] if isinstance(raw_until, str) else raw_until
        if not isinstance(raw_until, list) or not all(isinstance(u, str) for u in raw_until):
            fail("generation_kwargs.until", "expected a string or a list of strings")
        until = tuple(raw_until)
        max_gen_toks = gen.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            fail("generation_kwargs.max_gen_toks", "expected a positive integer")
    elif gen is not None:
        fail("generation_kwargs", f"only for output_type generate_until (this task is {output_type})")

    metrics = lmeval_metrics.validate_metrics(raw.get("metric_list"), output_type, fail)
    filters = lmeval_metrics.validate_filters(raw.get("filter_list"), output_type, fail)
    digest = hashlib.sha256(b"".join(hashlib.sha256(d).digest() for _, d in files)).hexdigest()
    return TaskFile(
        name=name, path=path, digest=f"sha256:{digest}", output_type=output_type, data_format=fmt, data_files=data_files,
        test_split=splits["test_split"], validation_split=splits["validation_split"], training_split=splits["training_split"],
        doc_to_text=raw.get("doc_to_text"), doc_to_target=raw.get("doc_to_target"), doc_to_choice=raw.get("doc_to_choice"),
        description=raw.get("description", ""), target_delimiter=raw.get("target_delimiter", " "),
        fewshot_delimiter=raw.get("fewshot_delimiter", "\n\n"), fewshot=fewshot, num_fewshot=num_fewshot, metrics=metrics,
        filters=filters, until=until, max_gen_toks=max_gen_toks, files=tuple(p for p, _ in files),
    )


def _data_files(value: Any, base: str, fail) -> dict[str, tuple[str, ...]]:
    from pipeline import storage as st

    def resolve(p: Any) -> str:
        if not isinstance(p, str) or not p:
            fail(f"expected file paths, got {p!r}")
        return p if os.path.isabs(p) or st.is_remote(p) else st.join(base, p)

    def files(v: Any) -> tuple[str, ...]:
        if isinstance(v, str):
            return (resolve(v),)
        if isinstance(v, list) and v:
            return tuple(resolve(p) for p in v)
        fail(f"expected a file or a list of files, got {v!r}")

    if isinstance(value, dict):
        return {str(split): files(v) for split, v in value.items()}
    return {"train": files(value)}  # Hugging Face datasets: files without a split are "train"


def task_files_in(path: str, storage) -> list[str]:
    """A YAML file, or every ``*.yaml`` under a folder (sorted) that names a task."""
    if path.endswith((".yaml", ".yml")):
        return [path]
    found = [f for f in storage.find_files(path) if f.endswith((".yaml", ".yml"))]
    if not found:
        raise TaskFileError(f"{path}: no task YAML files there")
    return found


# -- documents -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BadDoc:
    where: str  # "file:line" or "file#index"
    reason: str
    message: str


@dataclass
class TaskDocs:
    """Every split's documents, each with where it came from; what could not be read, quarantined."""

    splits: dict[str, list[dict]]
    where: dict[str, list[str]]
    bad: list[BadDoc]
    data_digests: dict[str, str]  # file -> sha256


def _parse_json(path: str, data: bytes) -> tuple[list[dict], list[str], list[BadDoc]]:
    text = data.decode("utf-8")
    docs, where, bad = [], [], []
    if text.lstrip().startswith("["):  # a JSON array of records, as Hugging Face's json loader reads it
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, r in enumerate(records):
            if isinstance(r, dict):
                docs.append(r)
                where.append(f"{path}#{i}")
            else:
                bad.append(BadDoc(f"{path}#{i}", "not_an_object", f"{path}#{i}: a document is a JSON object"))
        return docs, where, bad
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(BadDoc(f"{path}:{n}", "invalid_json", f"{path}:{n}: invalid JSON: {e.msg}"))
            continue
        if not isinstance(r, dict):
            bad.append(BadDoc(f"{path}:{n}", "not_an_object", f"{path}:{n}: a document is a JSON object"))
            continue
        docs.append(r)
        where.append(f"{path}:{n}")
    return docs, where, bad


def _uniform(docs: list[dict]) -> list[dict]:
    """Documents as an Arrow table gives them back (what lm-eval sees through Hugging Face
    datasets): a field missing from one document is None there, numbers share one type."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(docs).to_pylist() if docs else docs
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return docs


def load_docs(task: TaskFile, storage) -> TaskDocs:
    splits, wheres, bad, digests = {}, {}, [], {}
    for split, paths in task.data_files.items():
        docs, where = [], []
        for path in paths:
            try:
                data = storage.read_bytes(path)
            except FileNotFoundError:
                raise TaskFileError(f"{task.path}: data file {path} (split {split!r}) does not exist") from None
            digests[path] = f"sha256:{hashlib.sha256(data).hexdigest()}"
            if task.data_format == "parquet":
                import io

                import pyarrow.parquet as pq

                rows = pq.read_table(io.BytesIO(data)).to_pylist()
                docs += rows
                where += [f"{path}#{i}" for i in range(len(rows))]
                if not rows:
                    raise TaskFileError(f"{task.path}: data file {path} (split {split!r}) holds no documents")
                continue
            d, w, b = _parse_json(path, data)
            if not d and not b:
                raise TaskFileError(f"{task.path}: data file {path} (split {split!r}) is empty")
            docs += d
            where += w
            bad += b
        splits[split] = _uniform(docs)
        wheres[split] = where
    if not splits.get(task.eval_split):
        raise TaskFileError(f"{task.path}: split {task.eval_split!r} has no readable documents")
    return TaskDocs(splits, wheres, bad, digests)


# -- prompts: lm-eval's ConfigurableTask, doc by doc -----------------------------------------------------

class DocError(ValueError):
    """One document that cannot be scored; ``reason`` is its snake_case quarantine reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Prompter:
    """doc_to_text / doc_to_target / doc_to_choice and the few-shot context, as lm-eval computes them."""

    def __init__(self, task: TaskFile, docs: TaskDocs):
        self.task = task
        eval_docs = docs.splits[task.eval_split]
        self.features = set(eval_docs[0].keys())
        self.multiple_input = False
        self.multiple_target = False
        try:
            first = eval_docs[0]
            text = self.doc_to_text(first)
            if task.doc_to_choice is not None and isinstance(text, int):
                self.multiple_input = True  # Winogrande: one context per choice, the gold index from doc_to_text
            self.multiple_target = isinstance(self.doc_to_target(first), list)
        except DocError as e:
            raise TaskFileError(f"{task.path}: the first document ({docs.where[task.eval_split][0]}) decides the task's shape "
                                f"and cannot be rendered: {e}") from None

    def _render(self, template: str, doc: dict, key: str) -> str:
        try:
            return apply_template(template, doc)
        except Exception as e:  # Jinja raises many types (UndefinedError, TypeError from a filter, ...)
            raise DocError("template_error", f"{key}: {type(e).__name__}: {e}") from None

    def doc_to_text(self, doc: dict, spec: Any = None):
        spec = self.task.doc_to_text if spec is None else spec
        if isinstance(spec, int):
            return spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            text = self._render(spec, doc, "doc_to_text")
            if text.isdigit() and self.task.doc_to_choice is not None:
                return ast.literal_eval(text)
            return text
        raise DocError("template_error", f"doc_to_text: cannot use {spec!r}")

    def doc_to_target(self, doc: dict, spec: Any = None):
        spec = self.task.doc_to_target if spec is None else spec
        if isinstance(spec, int):
            return spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            text = self._render(spec, doc, "doc_to_target")
            if text.isdigit() and self.task.doc_to_choice is not None:
                return ast.literal_eval(text)
            if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
                try:
                    return ast.literal_eval(text)
                except (SyntaxError, ValueError):
                    return text
            return text
        if isinstance(spec, list):
            return spec
        raise DocError("template_error", f"doc_to_target: cannot use {spec!r}")

    def doc_to_choice(self, doc: dict, spec: Any = None) -> list:
        spec = self.task.doc_to_choice if spec is None else spec
        if isinstance(spec, str):
            if spec in self.features:
                choices = doc[spec]
            else:
                text = self._render(spec, doc, "doc_to_choice")
                try:
                    choices = ast.literal_eval(text)
                except (SyntaxError, ValueError) as e:
                    raise DocError("template_error", f"doc_to_choice: {text[:80]!r} is not a Python list: {e}") from None
        elif isinstance(spec, list):
            choices = spec
        elif isinstance(spec, dict):
            choices = list(spec.values())
        else:
            raise DocError("template_error", f"doc_to_choice: cannot use {spec!r}")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise DocError("empty_choices", f"doc_to_choice: gave {choices!r}, not a list of choices")
        return list(choices)

    def description(self, doc: dict) -> str:
        d = self.task.description
        if not d:
            return ""
        return doc[d] if d in doc else self._render(d, doc, "description")

    def _qa_turn(self, q, c, a, tgt_delim: str, few_delim: str) -> str:
        """lm-eval's build_qa_turn rendered as text (no chat template, no gen_prefix)."""
        if not isinstance(q, str):
            raise DocError("template_error", f"doc_to_text gave {type(q).__name__} {q!r}, not a string")
        has_answer = a is not None and a != ""
        if not has_answer:
            return q
        if c and isinstance(a, int) and not 0 <= a < len(c):
            raise DocError("bad_fewshot_document", f"a few-shot document's gold index {a} is out of range for {len(c)} choices")
        answer = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
        if not isinstance(answer, str):
            raise DocError("template_error", f"the few-shot answer {answer!r} is not a string")
        return q + tgt_delim + answer + few_delim

    def shot_text(self, shot: dict) -> str:
        fs = self.task.fewshot
        q = self.doc_to_text(shot, fs["doc_to_text"])
        c = self.doc_to_choice(shot, fs["doc_to_choice"]) if fs["doc_to_choice"] else None
        a = self.doc_to_target(shot, fs["doc_to_target"])
        if self.multiple_input:
            if not isinstance(q, int) or not c or not 0 <= q < len(c):
                raise DocError("gold_out_of_range", f"few-shot document: context index {q!r} for {len(c or [])} choices")
            q, c = c[q], None
        return self._qa_turn(q, c, a, fs["target_delimiter"], fs["fewshot_delimiter"])


class FewshotSampler:
    """lm-eval's ContextSampler / FirstNSampler: one ``random.Random(seed)`` drawn from document
    after document, so document i's shots depend on the seed and on i, as in lm-eval."""

    def __init__(self, pool: list[dict], sampler: str, seed: int, indices: Optional[Sequence[int]] = None):
        self.docs = list(pool)
        self.pool = [pool[i] for i in indices] if indices else list(pool)  # lm-eval's first_n ignores the indices
        self.sampler = sampler
        self.rnd = random.Random(seed)

    def sample(self, n: int, eval_doc: Optional[dict]) -> list[dict]:
        if n == 0:
            return []
        if self.sampler == "first_n":
            pool = [x for x in self.docs if x != eval_doc] if eval_doc is not None else self.docs
            if n > len(pool):
                raise TaskFileError(f"{n}-shot: only {len(pool)} few-shot documents")
            return pool[:n]
        if eval_doc is None:
            return self.rnd.sample(self.pool, n)
        if n + 1 > len(self.pool):
            raise TaskFileError(f"{n}-shot: only {len(self.pool)} few-shot documents (the document itself excluded)")
        res = [x for x in self.rnd.sample(self.pool, n + 1) if x != eval_doc][:n]
        if len(res) < n:
            res = self.rnd.sample([x for x in self.pool if x != eval_doc], n)
        return res


@dataclass(frozen=True)
class DocRequest:
    """One document as its requests to the model and what scoring needs.

    multiple_choice: ``pairs`` are (context, continuation) per choice; ``choices`` the choice
    strings; ``gold`` an index (or indices). loglikelihood: one pair, ``target`` its continuation.
    loglikelihood_rolling: ``target`` is the text. generate_until: ``pairs[0][0]`` is the prompt,
    ``target`` the gold answer(s)."""

    doc_id: int
    where: str
    pairs: tuple[tuple[str, str], ...]
    gold: Any = None
    choices: tuple[str, ...] = ()
    target: Any = None


def _fewshot_pool(task: TaskFile, docs: TaskDocs) -> list[dict]:
    fs = task.fewshot
    if fs["split"] is not None:
        return docs.splits[fs["split"]]
    if fs.get("samples") is not None:
        return list(fs["samples"])
    for split in (task.training_split, task.validation_split, task.test_split):  # lm-eval's Task.fewshot_docs
        if split is not None:
            return docs.splits[split]
    return []


def build_doc_requests(task: TaskFile, docs: TaskDocs, num_fewshot: int, limit: Optional[int] = None,
                       seed: int = DEFAULT_FEWSHOT_SEED) -> tuple[list[DocRequest], list[BadDoc]]:
    """Every evaluated document's requests (the first ``limit``, as lm-eval's ``--limit``); a
    document that cannot be rendered or scored is quarantined with its reason."""
    prompter = Prompter(task, docs)
    eval_docs = docs.splits[task.eval_split]
    where = docs.where[task.eval_split]
    sampler = FewshotSampler(_fewshot_pool(task, docs), task.fewshot["sampler"], seed, task.fewshot.get("fewshot_indices"))
    same_split = task.fewshot["split"] == task.test_split
    out: list[DocRequest] = []
    bad: list[BadDoc] = []
    n_docs = len(eval_docs) if limit is None else min(limit, len(eval_docs))
    for i in range(n_docs):
        doc = eval_docs[i]
        try:
            # the shots are drawn first, as lm-eval does, so a bad document never shifts another's shots
            shots = sampler.sample(num_fewshot, doc if same_split else None) if num_fewshot else []
            out.append(_doc_request(task, prompter, i, where[i], doc, shots))
        except DocError as e:
            bad.append(BadDoc(where[i], e.reason, f"{where[i]}: {e}"))
    return out, bad


def _doc_request(task: TaskFile, p: Prompter, doc_id: int, where: str, doc: dict, shots: list[dict]) -> DocRequest:
    prefix = p.description(doc) + "".join(p.shot_text(s) for s in shots)
    kind = task.output_type
    if kind == "loglikelihood_rolling":
        text = p.doc_to_target(doc)
        if not isinstance(text, str) or not text:
            raise DocError("empty_target", f"doc_to_target gave {text!r}: no text to score")
        return DocRequest(doc_id, where, (), target=text)
    choices = p.doc_to_choice(doc) if task.doc_to_choice is not None else None
    if kind == "multiple_choice":
        if not all(isinstance(c, str) for c in choices):
            raise DocError("template_error", f"doc_to_choice: the choices {choices!r} are not all strings")
        if p.multiple_input:
            gold = p.doc_to_text(doc)
            contexts = [prefix + p._qa_turn(c, None, None, "", "") for c in choices]
            cont = p.doc_to_target(doc)
            pairs = tuple((ctx, f"{task.target_delimiter}{cont}") for ctx in contexts)
        else:
            gold = p.doc_to_target(doc)
            ctx = prefix + p._qa_turn(p.doc_to_text(doc), choices, None, task.target_delimiter, "")
            pairs = tuple((ctx, f"{task.target_delimiter}{c}") for c in choices)
        return DocRequest(doc_id, where, pairs, _gold_index(gold, choices), tuple(choices))
    ctx = prefix + p._qa_turn(p.doc_to_text(doc), choices, None, task.target_delimiter, "")
    target = p.doc_to_target(doc)
    if kind == "loglikelihood":
        if not isinstance(target, str):
            raise DocError("template_error", f"doc_to_target gave {target!r}: a loglikelihood task scores a string")
        return DocRequest(doc_id, where, ((ctx, target),), target=target)
    # generate_until: the gold answer(s) as lm-eval's process_results compares them
    if ctx == "":  # nothing to condition on: the model would have no token to start from
        raise DocError("empty_prompt", "the prompt (description, shots and doc_to_text) is empty: nothing to generate from")
    if choices is not None:
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise DocError("gold_out_of_range", f"doc_to_target gave {target!r} for {len(choices)} choices")
        target = choices[target]
    elif p.multiple_target:
        target = list(target) if isinstance(target, (list, tuple)) else [target]
    return DocRequest(doc_id, where, ((ctx, ""),), target=target if isinstance(target, list) else str(target))


def _gold_index(gold: Any, choices: list[str]):
    """lm-eval's gold for multiple choice: an index, a choice string, or a list of indices; one
    that names no choice is quarantined here (lm-eval would silently score it as wrong)."""
    if isinstance(gold, bool):
        raise DocError("gold_out_of_range", f"gold {gold!r} is not an index")
    if isinstance(gold, list):
        if not gold or not all(isinstance(g, int) and 0 <= g < len(choices) for g in gold):
            raise DocError("gold_out_of_range", f"gold {gold!r} for {len(choices)} choices")
        return tuple(gold)
    if isinstance(gold, str):
        if gold not in choices:
            raise DocError("gold_out_of_range", f"gold {gold!r} is not one of the choices")
        return choices.index(gold)
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DocError("gold_out_of_range", f"gold index {gold!r} for {len(choices)} choices")
    return gold
