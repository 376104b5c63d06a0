"""The stage graph: inputs resolved, cycles rejected, column contracts checked statically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pipeline.types import ConfigError
from pipeline.registry import get_stage_class
from pipeline.stage import Stage

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import LoadedConfig


@dataclass(frozen=True)
class InputRef:
    stage: str
    dataset: str

    def __str__(self) -> str:
        return self.stage if self.dataset == "data" else f"{self.stage}.{self.dataset}"


@dataclass(frozen=True)
class Node:
    name: str
    cls: type[Stage]
    inputs: tuple[InputRef, ...]


def parse_input(ref: str, where: str, source: str) -> InputRef:
    stage, _, dataset = ref.partition(".")
    if not stage:
        raise ConfigError(f"{source}: {where}: empty input name")
    return InputRef(stage, dataset or "data")


def build_dag(loaded: "LoadedConfig") -> list[Node]:
    """Return nodes in a deterministic topological order (YAML order among ready stages)."""
    cfg = loaded.declared
    source = loaded.path
    nodes: dict[str, Node] = {}
    for name, entry in cfg.stages.items():
        cls = get_stage_class(entry.uses)
        refs = tuple(parse_input(r, f"stages.{name}.inputs[{i}]", source) for i, r in enumerate(entry.inputs))
        lo, hi = cls.num_inputs
        if len(refs) < lo or (hi is not None and len(refs) > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ConfigError(f"{source}: stages.{name}.inputs: stage '{entry.uses}' takes {want} input(s), got {len(refs)}")
        for i, ref in enumerate(refs):
            if ref.stage not in cfg.stages:
                raise ConfigError(f"{source}: stages.{name}.inputs[{i}]: no stage named {ref.stage!r}")
            if ref.stage == name:
                raise ConfigError(f"{source}: stages.{name}.inputs[{i}]: a stage cannot read its own output")
            upstream_cls = get_stage_class(cfg.stages[ref.stage].uses)
            if ref.dataset not in upstream_cls.outputs:
                raise ConfigError(
                    f"{source}: stages.{name}.inputs[{i}]: stage {ref.stage!r} has no dataset {ref.dataset!r}"
                    f" (it writes: {', '.join(upstream_cls.outputs)})"
                )
        nodes[name] = Node(name, cls, refs)

    order: list[Node] = []
    done: set[str] = set()
    remaining = list(nodes)
    while remaining:
        ready = [n for n in remaining if all(r.stage in done for r in nodes[n].inputs)]
        if not ready:
            raise ConfigError(f"{source}: stages: the inputs form a cycle among {', '.join(remaining)}")
        for n in ready:
            order.append(nodes[n])
            done.add(n)
            remaining.remove(n)

    _check_columns(order, source)
    return order


def _check_columns(order: list[Node], source: str) -> None:
    columns: dict[str, Optional[set[str]]] = {}
    for node in order:
        in_cols: Optional[set[str]] = None
        if node.inputs:
            first = node.inputs[0]
            in_cols = columns.get(first.stage) if first.dataset == "data" else None
        if in_cols is not None:
            missing = [c for c in node.cls.requires if c not in in_cols]
            if missing:
                raise ConfigError(
                    f"{source}: stages.{node.name}: stage '{node.cls.name}' requires column(s) {missing}"
                    f" that {node.inputs[0].stage!r} does not produce (it has: {sorted(in_cols)})"
                )
        columns[node.name] = node.cls.output_columns(in_cols)


def downstream_of(order: list[Node], start: str) -> list[str]:
    """``start`` and every stage that depends on it, transitively, in run order."""
    selected = {start}
    for node in order:
        if any(r.stage in selected for r in node.inputs):
            selected.add(node.name)
    return [n.name for n in order if n.name in selected]


def upstream_of(order: list[Node], target: str) -> list[str]:
    by_name = {n.name: n for n in order}
    needed: set[str] = set()
    stack = [target]
    while stack:
        cur = stack.pop()
        for ref in by_name[cur].inputs:
            if ref.stage not in needed:
                needed.add(ref.stage)
                stack.append(ref.stage)
    return [n.name for n in order if n.name in needed]
