"""The stage registry: ``uses: <name>`` in YAML resolves here.

Built-in stages live in ``stages/<name>/stage.py`` and register themselves on import; third-party
packages can add stages through the ``lmpipe.stages`` entry-point group.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from importlib.metadata import entry_points

from pipeline.stage import Stage

_REGISTRY: dict[str, type[Stage]] = {}
_DISCOVERED = False


class StageNotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage name {cls.name!r} is registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import stages

    for info in pkgutil.iter_modules(stages.__path__):
        if info.ispkg:
            # A stage package's stage module registers it. Importing it rather than relying on the
            # package's __init__ lets __init__ stay empty: it runs whenever any module of the
            # package is imported, so it is in the code digest of every stage that imports one.
            has_stage = any(m.name == "stage" for m in pkgutil.iter_modules([os.path.join(p, info.name) for p in stages.__path__]))
            importlib.import_module(f"stages.{info.name}.stage" if has_stage else f"stages.{info.name}")
    for ep in entry_points(group="lmpipe.stages"):
        ep.load()


def get_stage_class(name: str) -> type[Stage]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise StageNotFound(f"unknown stage {name!r} (registered: {known})") from None


def all_stages() -> dict[str, type[Stage]]:
    _discover()
    return dict(sorted(_REGISTRY.items()))


def write_demo_data(out_dir: str) -> dict[str, int]:
    """``lmpipe fetch-demo-data``: the demo corpus, written by ``stages.demo_data`` (the registry
    is the one place where pipeline/ reaches stages' code)."""
    from stages.demo_data import prepare_demo_data

    return prepare_demo_data(out_dir)


def trace_step(**kwargs):
    """``lmpipe trace --step``: the sequences a training step read (``stages.train.trace``, which
    maps steps to token shard rows with the trainer's own order)."""
    from stages.train.trace import sequences_at_step

    return sequences_at_step(**kwargs)


def trace_row(**kwargs):
    """``lmpipe trace --shard F --row R``: the sequence at a token shard row and the steps that read it."""
    from stages.train.trace import sequences_at_row

    return sequences_at_row(**kwargs)


def trace_document_sequences(**kwargs):
    """``lmpipe trace --doc``: the token shard rows that hold a document and the steps that read them."""
    from stages.train.trace import sequences_of_document

    return sequences_of_document(**kwargs)
