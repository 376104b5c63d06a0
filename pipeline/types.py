"""The ground floor of ``pipeline/``: types every other module shares, importing nothing of
``pipeline`` but :mod:`pipeline.storage`. Keeping them here is what lets ``config`` import the
registry and the DAG, and ``stage`` and ``io`` share the reason columns, without cycles."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from pipeline import storage as st

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Row routing: a row stage sets one of these per row (null keeps the row).
DROP_REASON = "drop_reason"  # rejected by a rule, with the rule's name
QUARANTINE_REASON = "quarantine_reason"  # bad input, with what is wrong with it
REASON_COLUMNS = (DROP_REASON, QUARANTINE_REASON)


class ConfigError(ValueError):
    """A pipeline file is invalid. The message names the file and the YAML path."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    base = (info.context or {}).get("base_dir")
    if base is None or value is None or st.is_remote(value) or ENV_REF.search(value):
        return value
    if value.startswith("file://"):
        value = value[len("file://") :]
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# A path in a config: relative paths are relative to the pipeline file's folder; s3:// kept.
PathStr = Annotated[str, AfterValidator(_resolve_path)]


PERFORMANCE_ONLY = "lmpipe_performance_only"


def PerformanceField(default: Any, **kwargs: Any) -> Any:
    """A config field that changes how fast a stage runs or how much memory it takes, never a
    byte of what it writes (a test must show that): left out of the stage's fingerprint, so
    tuning it reuses the cache instead of recomputing everything downstream."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[PERFORMANCE_ONLY] = True
    return Field(default, json_schema_extra=extra, **kwargs)


def fingerprinted_config(config: BaseModel) -> dict[str, Any]:
    """The config as JSON, without its performance-only fields (at any depth)."""
    return _prune(config, config.model_dump(mode="json"))


def _prune(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        out = {}
        for name, info in type(value).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if name in dumped and not extra.get(PERFORMANCE_ONLY):
                out[name] = _prune(getattr(value, name), dumped[name])
        return out
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_prune(v, d) for v, d in zip(value, dumped)]
    if isinstance(value, dict) and isinstance(dumped, dict):
        return {dk: _prune(v, dv) for (dk, dv), v in zip(dumped.items(), value.values())}
    return dumped
