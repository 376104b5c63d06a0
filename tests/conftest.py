"""Shared fixtures: one local Ray per test session, pipeline files in tmp folders, real corpora."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("LMPIPE_PROGRESS", "0")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every in-process test (starting one costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()


def write_pipeline(folder: Path, body: str, name: str = "pipeline.yaml") -> Path:
    """Write a pipeline file; ``body`` is dedented YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def pipeline_file(tmp_path):
    def make(body: str, name: str = "pipeline.yaml") -> Path:
        return write_pipeline(tmp_path, body, name)

    return make


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """The real demo corpus (news articles + Python docs), fetched and checksummed once."""
    from stages.assets import prepare_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    prepare_demo_data(out)
    return out
