"""A credential written in the pipeline file would be copied into MLflow (the file is logged as an
artifact) and into every submitted job: a literal value is refused, naming the key, before anything
is logged or uploaded; a ``${VAR}`` reference is resolved in memory only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, load_config

LITERAL = "LITERAL-SECRET-VALUE-4242"
BODY = """
name: creds
work_dir: {work}
storage:
  s3:
    endpoint_url: {endpoint}
    key: {key}
    secret: {secret}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: s, paths: ["{work}/in.jsonl"]}}]}}
"""


def _body(tmp_path, key="${LMPIPE_TEST_KEY}", secret="${LMPIPE_TEST_SECRET}", endpoint="http://127.0.0.1:9"):
    return BODY.format(work=tmp_path / "work", key=key, secret=secret, endpoint=endpoint)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("storage.s3.secret", {"secret": LITERAL}),
    ("storage.s3.key", {"key": LITERAL}),
    ("storage.s3.secret", {"secret": f"prefix-${{LMPIPE_TEST_SECRET}}"}),  # a value with a reference in it is still partly literal
    ("storage.s3.endpoint_url", {"endpoint": f"http://user:{LITERAL}@127.0.0.1:9"}),
])
def test_a_literal_credential_is_refused_naming_the_key(pipeline_file, tmp_path, monkeypatch, field, kwargs):
    monkeypatch.setenv("LMPIPE_TEST_KEY", "k")
    monkeypatch.setenv("LMPIPE_TEST_SECRET", "s")
    path = pipeline_file(_body(tmp_path, **kwargs))
    with pytest.raises(ConfigError, match=rf"^{path}: {field}: .*never written in the pipeline file") as e:
        load_config(path)
    assert LITERAL not in str(e.value) and "\n" not in str(e.value)


def test_a_reference_is_accepted_and_resolved_in_memory_only(pipeline_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LMPIPE_TEST_KEY", "k")
    monkeypatch.setenv("LMPIPE_TEST_SECRET", LITERAL)
    loaded = load_config(pipeline_file(_body(tmp_path)))
    assert loaded.storage.options["s3"]["secret"] == LITERAL and LITERAL not in loaded.text


def _files_holding(root, needle: bytes) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            p = os.path.join(folder, name)
            try:
                with open(p, "rb") as f:
                    if needle in f.read():
                        found.append(p)
            except OSError:
                pass
    return found


@pytest.mark.parametrize("command", ["run", "submit"])
def test_run_and_submit_refuse_it_before_logging_or_uploading_anything(tmp_path, command):
    """``run`` would log the file to its MLflow store, ``submit`` would stage it for upload: neither
    starts, and no file anywhere under the work dir or the temporary folder holds the value."""
    config = tmp_path / "p.yaml"
    config.write_text(_body(tmp_path, secret=LITERAL))
    (tmp_path / "tmp").mkdir()
    args = ["run", str(config)] if command == "run" else ["submit", str(config), "--address", "http://127.0.0.1:9"]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "LMPIPE_TEST_KEY": "k"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert f"{config}: storage.s3.secret: a credential is never written in the pipeline file" in out.stderr
    assert LITERAL not in out.stdout + out.stderr
    assert _files_holding(tmp_path, LITERAL.encode()) == [str(config)]
    assert not (tmp_path / "work").exists() and os.listdir(tmp_path / "tmp") == []
