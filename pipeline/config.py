"""Pipeline configuration: one YAML file, validated completely before any work starts.

Two views of the same file are kept:

* the *declared* view, exactly as written (``${VAR}`` references left in place, relative paths
  relative). It is what gets fingerprinted and logged, so secrets never reach MLflow or the
  cache keys.
* the *resolved* view, with environment variables substituted and paths made absolute
  (relative to the YAML file's folder). Only the runner's workers see it.

Every error names the YAML path of the offending key, e.g.
``stages.filter.config.min_words: Input should be greater than 0``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipeline import storage as st
from pipeline.dag import build_dag
from pipeline.registry import StageNotFound, get_stage_class
from pipeline.types import ENV_REF, ConfigError, PathStr, PerformanceField, StrictModel

__all__ = ["ConfigError", "LoadedConfig", "PathStr", "PerformanceField", "PipelineConfig", "StrictModel", "load_config"]

STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def lmpipe_home() -> str:
    """What belongs to no work dir (the default MLflow store of a pipeline whose work_dir is on
    S3): ``$LMPIPE_HOME``, else ``~/.lmpipe``. It was ``./.lmpipe``, so ``lmpipe status`` from
    another folder saw other runs, or none."""
    return os.path.abspath(os.path.expanduser(os.environ.get("LMPIPE_HOME") or "~/.lmpipe"))


class ResourcesConfig(StrictModel):
    """Per-stage overrides of the resources a stage declares."""

    num_cpus: Optional[float] = Field(default=None, ge=0)
    num_gpus: Optional[float] = Field(default=None, ge=0)
    max_workers: Optional[int] = Field(default=None, ge=1, description="upper bound on parallel tasks/actors")
    batch_size: Optional[int] = Field(default=None, ge=1, description="rows per batch for row stages")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per worker")


class StageEntry(StrictModel):
    uses: str = Field(description="registered stage name, e.g. 'ingest'")
    inputs: list[str] = Field(default_factory=list, description="upstream stages; 'name' or 'name.dataset'")
    config: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


class MlflowConfig(StrictModel):
    tracking_uri: Optional[str] = Field(
        default=None, description="default: sqlite:///<work_dir>/mlflow.db for a local work_dir"
    )
    experiment: str = "lmpipe"
    artifact_location: Optional[str] = Field(default=None, description="for a new experiment; default <work_dir>/mlartifacts")


class RayConfig(StrictModel):
    address: Optional[str] = Field(default=None, description="None: start a local Ray; 'auto' or ray://… to connect")
    num_cpus: Optional[int] = Field(default=None, ge=1, description="CPUs of the local Ray (default: all)")
    include_dashboard: bool = False
    object_store_memory: Optional[int] = Field(default=None, ge=78643200)


class S3Options(StrictModel):
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    key: Optional[str] = Field(default=None, description="${AWS_ACCESS_KEY_ID} (a literal value is refused); or leave"
                                                        " key/secret/token out: the standard AWS chain (environment, ~/.aws, role)")
    secret: Optional[str] = Field(default=None, description="${AWS_SECRET_ACCESS_KEY} (a literal value is refused)")
    token: Optional[str] = Field(default=None, description="${AWS_SESSION_TOKEN} (a literal value is refused)")
    anon: Optional[bool] = None


class StorageConfig(StrictModel):
    s3: S3Options = Field(default_factory=S3Options)

    def fs_options(self) -> dict[str, dict[str, Any]]:
        return {"s3": {k: v for k, v in self.s3.model_dump().items() if v is not None}}


class VariantStage(StrictModel):
    """What a variant changes in one stage: keys of its config, deep-merged into the base's."""

    config: dict[str, Any] = Field(default_factory=dict, description="deep-merged into the stage's config (mappings merge, other values replace)")


class VariantConfig(StrictModel):
    """One variant of an ablation: the pipeline as written with these overrides
    (pipeline/variants.py expands and validates them)."""

    seed: Optional[int] = Field(default=None, description="the pipeline seed of this variant (default: the pipeline's)")
    seeds: list[int] = Field(default_factory=list, description="only under variants.base: the base is also run with each of these"
                                                               " seeds, to measure seed noise")
    stages: dict[str, VariantStage] = Field(default_factory=dict)


class ReleaseSource(StrictModel):
    """What a data card says about one ingested source that its records cannot: its licence."""

    license: str = Field(description="the source's licence as it should be cited (an SPDX id, or its words)")
    homepage: Optional[str] = Field(default=None, description="where the source is published")


class ReleaseConfig(StrictModel):
    """What ``lmpipe release`` writes into the cards beside what the records say (never part of a
    fingerprint: editing it recomputes nothing)."""

    license: Optional[str] = Field(default=None, description="the model's licence, a Hugging Face licence id (apache-2.0, mit,"
                                                             " other, ...); default: unknown")
    dataset_license: Optional[str] = Field(default=None, description="the dataset card's licence id (default: the sources' one"
                                                                     " licence when they share it, else other)")
    base_model: Optional[str] = Field(default=None, description="the model this one was trained from, if any (a hub id)")
    sources: dict[str, ReleaseSource] = Field(default_factory=dict, description="ingest source name -> its licence")


class PipelineConfig(StrictModel):
    name: str = Field(min_length=1)
    work_dir: PathStr
    seed: int = Field(default=0, description="base seed; stages derive their own from it and their name")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    stages: dict[str, StageEntry] = Field(min_length=1)
    variants: dict[str, VariantConfig] = Field(default_factory=dict, description="an ablation: named variants of the pipeline"
                                                                                 " (lmpipe run runs the base and each)")
    release: ReleaseConfig = Field(default_factory=ReleaseConfig, description="licences and base model for lmpipe release's cards")

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages: dict[str, StageEntry]) -> dict[str, StageEntry]:
        for name in stages:
            if not STAGE_NAME.match(name):
                raise ValueError(f"stage name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
        return stages

    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{os.path.join(self._local_root(), 'mlflow.db')}"

    def artifact_location(self) -> Optional[str]:
        if self.mlflow.artifact_location:
            return self.mlflow.artifact_location
        if self.tracking_uri().startswith(("http://", "https://", "databricks")):
            return None  # a tracking server decides (proxied artifacts)
        return Path(os.path.join(self._local_root(), "mlartifacts")).as_uri()

    def _local_root(self) -> str:
        """Where the default MLflow store lives: the work dir, or for a remote one lmpipe's home
        (one place, whatever folder lmpipe runs from)."""
        return os.path.abspath(self.work_dir) if not st.is_remote(self.work_dir) else lmpipe_home()

    def describe_tracking(self) -> str:
        """The line a run starts with: where its lineage goes."""
        uri = self.tracking_uri()
        if not self.mlflow.tracking_uri and st.is_remote(self.work_dir):
            return (f"MLflow store: {uri} (the default for a remote work_dir: $LMPIPE_HOME, else ~/.lmpipe, on this machine;"
                    f" set mlflow.tracking_uri to a server to share it)")
        return f"MLflow store: {uri}"


@dataclass(frozen=True)
class LoadedConfig:
    """A validated pipeline file: both views plus where it came from."""

    path: str
    text: str  # the file as written (no secrets substituted): logged as an artifact
    declared: PipelineConfig  # ${VAR} kept, relative paths kept: fingerprints and logs
    resolved: PipelineConfig  # env substituted, paths absolute: execution
    declared_stage_configs: dict[str, Any]  # stage name -> validated stage config (declared view)
    resolved_stage_configs: dict[str, Any]  # stage name -> validated stage config (resolved view)
    base_dir: Optional[str] = None  # what relative paths were resolved against (variants resolve theirs the same way)

    @property
    def storage(self) -> st.Storage:
        return st.Storage(self.resolved.storage.fs_options())


def _format_loc(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts).replace(".[", "[")


def format_validation_error(err: ValidationError, prefix: str, source: str) -> str:
    lines = []
    for e in err.errors():
        where = _format_loc(prefix, tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {where}: {msg}")
    return "\n".join(lines)


def substitute_env(obj: Any, path: str, env: Optional[dict[str, str]] = None) -> Any:
    """Replace ``${VAR}`` in every string; a missing variable is an error naming the key."""
    env = os.environ if env is None else env
    if isinstance(obj, dict):
        return {k: substitute_env(v, f"{path}.{k}" if path else str(k), env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute_env(v, f"{path}[{i}]", env) for i, v in enumerate(obj)]
    if isinstance(obj, str):
        missing = [m for m in ENV_REF.findall(obj) if m not in env]
        if missing:
            raise ConfigError(f"{path}: environment variable {missing[0]} is not set")
        return ENV_REF.sub(lambda m: env[m.group(1)], obj)
    return obj


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key set twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key: left to the schema to refuse
                continue
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


ENV_REF_ONLY = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
CREDENTIAL_HINT = ("a credential is never written in the pipeline file (it would be copied into MLflow and into every"
                   " submitted job): write a ${VAR} reference, or leave it out and let the standard chain"
                   " (environment, ~/.aws, the instance role) provide it")


def refuse_literal_credentials(declared: PipelineConfig, path: str) -> None:
    """The file as written is logged to MLflow and uploaded by ``submit``: a credential in it must be
    a ``${VAR}`` reference (resolved only in memory), never the value."""
    for key in ("key", "secret", "token"):
        value = getattr(declared.storage.s3, key)
        if value is not None and not ENV_REF_ONLY.fullmatch(value.strip()):
            raise ConfigError(f"{path}: storage.s3.{key}: {CREDENTIAL_HINT}")
    for where, url in (("mlflow.tracking_uri", declared.mlflow.tracking_uri), ("storage.s3.endpoint_url", declared.storage.s3.endpoint_url)):
        try:
            password = urlparse(url).password if url else None
        except ValueError:
            password = None
        if password is not None and not ENV_REF_ONLY.fullmatch(password):
            raise ConfigError(f"{path}: {where}: a password in the URL; {CREDENTIAL_HINT}")


def load_config(path: str | os.PathLike, overrides: Optional[dict[str, Any]] = None, base_dir: Optional[str] = None) -> LoadedConfig:
    """Read, validate and resolve a pipeline file; raise ConfigError naming the key on any problem."""

    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read pipeline file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); a pipeline file is YAML") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {e.key!r} (first at line {e.first_line}); a YAML file may set a key once") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with name, work_dir and stages")
    for key, value in (overrides or {}).items():
        raw[key] = value
    base_dir = os.path.abspath(base_dir) if base_dir else os.path.dirname(path)

    def validate(model: type[BaseModel], data: Any, prefix: str, resolve_paths: bool) -> Any:
        try:
            return model.model_validate(data, context={"base_dir": base_dir if resolve_paths else None})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix, path)) from None

    declared = validate(PipelineConfig, raw, "", resolve_paths=False)
    refuse_literal_credentials(declared, path)
    try:
        resolved_raw = substitute_env(raw, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    resolved = validate(PipelineConfig, resolved_raw, "", resolve_paths=True)

    declared_stage_cfgs: dict[str, Any] = {}
    resolved_stage_cfgs: dict[str, Any] = {}
    for name, entry in declared.stages.items():
        try:
            cls = get_stage_class(entry.uses)
        except StageNotFound as e:
            raise ConfigError(f"{path}: stages.{name}.uses: {e}") from None
        prefix = f"stages.{name}.config"
        declared_stage_cfgs[name] = validate(cls.Config, entry.config, prefix, resolve_paths=False)
        resolved_stage_cfgs[name] = validate(cls.Config, resolved.stages[name].config, prefix, resolve_paths=True)

    loaded = LoadedConfig(path, text, declared, resolved, declared_stage_cfgs, resolved_stage_cfgs, base_dir)
    build_dag(loaded)  # validates inputs, cycles and column contracts
    return loaded
