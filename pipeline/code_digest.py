"""The digest of a stage's own code, part of its fingerprint: editing a stage can never reuse an
output that older code wrote, whether or not its ``version`` was bumped.

What is hashed, and nothing more (an over-broad digest recomputes outputs that an unrelated edit
cannot have changed, and every pipeline variant multiplies that waste):

* the stage's module, the packages above it (a package's ``__init__.py`` runs on import) and
  every module of its top-level package that it can import, directly or through each other
  (found statically, lazy imports inside functions included) -- so a stage's digest reaches
  another stage's code only where it imports it (shared code lives in packages that import no
  stage: ``stages/model``, ``stages/scoring``, ``stages/summaries``);
* the data files next to those modules (word lists, tokenizer tables);
* the framework modules that turn this stage's tables into bytes, as the stage declares them
  (``Stage.writes_through``: the Parquet/Arrow writers, part routing, storage), themselves only.

A module is hashed as its syntax tree without docstrings, so comments, formatting and
documentation can be edited without recomputing a corpus, while any change to what the code does
recomputes the stage and everything after it. The versions of the libraries that decide a stage's
bytes (``Stage.libraries``) are read from the installed distributions (:func:`library_versions`).

The per-module digests and library versions are recorded in the manifest, so ``lmpipe explain``
can name the file or the library whose change made a stage run again.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import os
from functools import lru_cache
from typing import Iterable, Optional

# What the digest covers (recorded in every fingerprint, so that ``lmpipe explain`` can say that
# a stage recomputes because the rule changed, not its code). 1: the stage's whole top-level
# package closure plus pipeline/io.py and pipeline/execute.py; 2: the closure of the stage's
# module, the framework modules it writes through, and its libraries' versions.
DIGEST_SCOPE = 2
DATA_SUFFIXES_IGNORED = (".pyc", ".pyo", ".md")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _tree_digest(tree: ast.AST) -> str:
    """sha256 of the code's syntax tree without docstrings (comments and layout never reach the AST)."""
    return hashlib.sha256(ast.dump(_strip_docstrings(tree), include_attributes=False).encode()).hexdigest()[:16]


@lru_cache(maxsize=None)
def _parsed(origin: str, mtime_ns: int, size: int) -> tuple[str, ast.AST]:
    """(digest, syntax tree) of one file, parsed once per process and version of the file."""
    with open(origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), origin)
    return _tree_digest(tree), tree  # stripping docstrings leaves the imports alone


def _parse(origin: str) -> tuple[str, ast.AST]:
    stat = os.stat(origin)
    return _parsed(origin, stat.st_mtime_ns, stat.st_size)


def _origin(module: str) -> Optional[str]:
    """The file of ``module``, found on disk below its top-level package, without importing it:
    ``from a.b import C`` names ``a.b.C``, and asking the import system about that would import
    ``a.b`` (torch, for the model code) just to learn that ``C`` is not a module."""
    top, _, rest = module.partition(".")
    root = _top_level_location(top)
    if root is None:
        return None
    if not rest:
        return root if os.path.isfile(root) else None
    base = os.path.join(os.path.dirname(root), *rest.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


@lru_cache(maxsize=None)
def _top_level_location(top: str) -> Optional[str]:
    """A top-level module's file (a package's ``__init__.py``); only the top level is looked up."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # a __main__ without spec
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return spec.origin


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in the file may refer to (``from a import b``: ``a``
    and ``a.b``, since ``b`` may be a submodule)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base:
                continue
            parts = base.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def module_closure(module: str, framework: Iterable[str] = (), presentation: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """(module name, file path) of ``module``, of the packages above it, and of every module of its
    top-level package that it imports, directly or through other such modules; plus the
    ``framework`` modules themselves (their own imports are the framework's, not the stage's).
    ``presentation`` modules (a stage's ``Stage.presentation``) and what only they import are left
    out: they draw committed outputs and never compute them."""
    top = module.split(".")[0]
    skipped = set(presentation)
    parts = module.split(".")
    seen: dict[str, str] = {}
    todo = [".".join(parts[: i + 1]) for i in range(len(parts))]
    while todo:
        name = todo.pop()
        if name in seen or name in skipped:
            continue
        origin = _origin(name)
        if origin is None:
            continue
        seen[name] = origin
        _, tree = _parse(origin)
        for dep in _imported_modules(tree, name, origin.endswith("__init__.py")):
            if dep.split(".")[0] == top and dep not in seen:
                todo.append(dep)
    for name in framework:
        origin = _origin(name)
        if origin is None:
            raise ValueError(f"framework module {name!r} (a stage's writes_through) is not a Python file on the path")
        seen[name] = origin
    return tuple(sorted(seen.items()))


def _display_name(module: str, origin: str) -> str:
    """``stages/tokenize/packing.py``: the module's path inside its package tree."""
    tail = module.replace(".", "/")
    return f"{tail}/__init__.py" if origin.endswith("__init__.py") else f"{tail}.py"


def code_digests(module: str, framework: Iterable[str] = (), presentation: Iterable[str] = ()) -> dict[str, str]:
    """{file: digest} for the stage module's closure (less its ``presentation`` modules), the data
    files beside those modules and the ``framework`` modules the stage writes through."""
    out: dict[str, str] = {}
    folders: dict[str, str] = {}
    framework = tuple(framework)
    for name, origin in module_closure(module, framework, presentation):
        out[_display_name(name, origin)] = _parse(origin)[0]
        if origin.endswith("__init__.py") and name not in framework:
            folders[os.path.dirname(origin)] = name.replace(".", "/")
    for folder, display in folders.items():
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.endswith(".py") or entry.endswith(DATA_SUFFIXES_IGNORED) or entry.startswith(".") or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                out[f"{display}/{entry}"] = hashlib.sha256(f.read()).hexdigest()[:16]
    return dict(sorted(out.items()))


def combined(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name, digest in sorted(digests.items()):
        h.update(f"{name}={digest}\n".encode())
    return h.hexdigest()[:16]


def library_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution`` (its metadata only: nothing is imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions(distributions: Iterable[str]) -> dict[str, Optional[str]]:
    """{distribution: installed version} of the libraries a stage declares (``Stage.libraries``)."""
    return {name: library_version(name) for name in sorted(set(distributions))}
