"""What a new user meets when a pipeline file or a command line is wrong: one clear line, and no
side effect (no store created, no value silently dropped)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ConfigError, load_config

BODY = """
name: x
work_dir: {work}
stages:
  a:
    uses: ingest
    config: {{sources: [{{name: s, paths: ["{work}/*.jsonl"]}}]}}
  a:
    uses: sample
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


def test_a_key_set_twice_is_refused_naming_both_lines(pipeline_file, tmp_path):
    path = pipeline_file(BODY.format(work=tmp_path))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}:8: duplicate key 'a' (first at line 5); a YAML file may set a key once"


def test_an_unset_variable_names_the_file_and_the_key(pipeline_file, tmp_path, monkeypatch):
    monkeypatch.delenv("LMPIPE_TEST_UNSET", raising=False)
    path = pipeline_file(f"name: x\nwork_dir: ${{LMPIPE_TEST_UNSET}}/w\nstages:\n  a:\n    uses: ingest\n"
                         f"    config: {{sources: [{{name: s, paths: ['{tmp_path}/*.jsonl']}}]}}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: work_dir: environment variable LMPIPE_TEST_UNSET is not set$"):
        load_config(path)


def test_status_refuses_a_store_that_does_not_exist_and_does_not_create_it(tmp_path):
    db = tmp_path / "typo" / "x.db"
    proc = _cli("status", "--tracking-uri", f"sqlite:///{db}")
    assert proc.returncode == 1 and f"no MLflow store at {db}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not db.exists() and not db.parent.exists()


def test_status_limit_must_be_positive():
    proc = _cli("status", "--tracking-uri", "sqlite:////nowhere.db", "--limit", "0")
    assert proc.returncode == 2 and "--limit: must be at least 1, got 0" in proc.stderr


def test_status_shows_a_run_whose_driver_died_as_killed(tmp_path):
    from pipeline.tracking import Tracker, recent_pipeline_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp")
    run_id = tracker.start_pipeline("p", str(tmp_path / "p.yaml"), "name: p", params={}, tags={})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tracker.client.set_tag(run_id, "lmpipe.pid", str(dead.pid))  # as if its driver had been killed
    [run] = recent_pipeline_runs(uri, 5)
    assert run.status == f"KILLED (driver pid {dead.pid} is gone)"
    tracker.client.set_tag(run_id, "lmpipe.pid", str(__import__("os").getpid()))
    assert recent_pipeline_runs(uri, 5)[0].status == "RUNNING"


@pytest.mark.parametrize("command", ["lineage", "eval-table"])
def test_a_missing_path_is_said_to_be_missing_not_looked_up_as_a_run(command, tmp_path):
    proc = _cli(command, str(tmp_path / "work" / "nothing"))
    assert proc.returncode == 1
    assert f"{tmp_path / 'work' / 'nothing'}: no such file or folder" in proc.stderr and "MlflowException" not in proc.stderr


def _pipeline(tmp_path, work: str, extra: str = "", name: str = "p.yaml") -> str:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "d.jsonl").write_text('{"text": "a document"}\n')
    path = tmp_path / name
    path.write_text(f"name: x\nwork_dir: {work}\n{extra}stages:\n  ingest:\n    uses: ingest\n"
                    f"    config: {{sources: [{{name: s, paths: ['{data}/*.jsonl']}}]}}\n")
    return str(path)


def test_wrong_addresses_fail_in_seconds_naming_the_address(tmp_path):
    """Ray retried for > 5 min, an MLflow server for > 2 min, an S3 endpoint for 79 s, silently."""
    import time

    from tests.conftest import free_port

    port = free_port()  # nothing listens there
    cases = [
        (["run", _pipeline(tmp_path, str(tmp_path / "w1")), "--address", f"127.0.0.1:{port}"], f"cannot reach the Ray cluster at 127.0.0.1:{port}"),
        (["status", "--tracking-uri", f"http://127.0.0.1:{port}"], f"cannot reach the MLflow tracking server at 127.0.0.1:{port}"),
        (["run", _pipeline(tmp_path, "s3://bucket/w", f"storage: {{s3: {{endpoint_url: 'http://127.0.0.1:{port}'}}}}\n", "s3.yaml")],
         f"cannot reach the S3 endpoint at 127.0.0.1:{port}"),
    ]
    for args, message in cases:
        started = time.monotonic()
        proc = _cli(*args)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert time.monotonic() - started < 60, args


def test_a_data_error_on_a_ray_worker_is_one_clear_line(ray_local, tmp_path):
    """A Parquet file without the text column failed deep in a Ray worker: the user got a 40-line
    Ray dump with colour codes, also stored in the lmpipe.error MLflow tag."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from pipeline.execute import PartFailed
    from pipeline.runner import Runner

    pq.write_table(pa.table({"body": ["hello world"]}), tmp_path / "a.parquet")
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\nwork_dir: {tmp_path / 'work'}\nstages:\n  ingest:\n    uses: ingest\n"
                    f"    config: {{sources: [{{name: s, paths: ['{tmp_path / 'a.parquet'}']}}]}}\n")
    with pytest.raises(PartFailed) as e:
        Runner(load_config(path)).run()  # on Ray: the part runs in a Ray Data worker
    assert str(e.value) == (f"stage 'ingest' failed on part 00000 ({tmp_path / 'a.parquet'}): KeyError: "
                            f"\"{tmp_path / 'a.parquet'}: no column 'text' (columns: body); set text_field on source 's' (a dotted path"
                            f" reaches into struct columns)\"")
    assert "KeyError" in e.value.worker_traceback  # kept for --traceback
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    [stage] = client.search_runs(["1"], "tags.`lmpipe.kind` = 'stage'")
    tag = stage.data.tags["lmpipe.error"]
    assert "PartFailed: stage 'ingest' failed on part 00000" in tag and "\x1b[" not in tag and "\n" not in tag


def test_the_cli_prints_a_worker_error_as_one_line(capsys, monkeypatch):
    from pipeline import cli
    from pipeline.execute import PartFailed

    def fail(args):
        raise PartFailed("stage 'ingest' failed on part 00000 (a.parquet): KeyError: 'text'", "Traceback (most recent call last): ...")

    monkeypatch.setattr(cli, "cmd_stages", fail)
    assert cli.main(["stages"]) == 1
    assert capsys.readouterr().err == ("lmpipe: error: stage 'ingest' failed on part 00000 (a.parquet): KeyError: 'text'"
                                       " (--traceback for the worker's traceback)\n")
    assert cli.main(["--traceback", "stages"]) == 1
    assert "on the worker:\nTraceback (most recent call last): ..." in capsys.readouterr().err


def test_a_full_disk_on_a_worker_says_what_to_do():
    import errno as errno_

    from pipeline.execute import part_error_message
    from pipeline.stage import Part

    e = OSError(errno_.ENOSPC, "No space left on device", "/data/work/x/part-00000-0000.parquet")
    message = part_error_message("quality_filter", Part("00003", {"uri": "/data/in.parquet"}), e)
    assert message == ("stage 'quality_filter' failed on part 00003 (/data/in.parquet): OSError: [Errno 28] No space left on device:"
                       " '/data/work/x/part-00000-0000.parquet'; free space there and run again (committed stages are kept, this one restarts)")


def test_a_full_disk_during_a_stage_is_one_line_naming_stage_part_and_what_to_do(tmp_path, monkeypatch):
    """A work dir on a 256 KiB filesystem (a real tmpfs where this machine lets the test mount one,
    else an injected ENOSPC at the first file write)."""
    import errno as errno_
    import json

    from pipeline.config import load_config
    from pipeline.execute import PartFailed
    from pipeline.runner import Runner
    from stages.assets import python_doc_topics

    data = tmp_path / "data"
    data.mkdir()
    words = " ".join(python_doc_topics().values()).split()
    rng = __import__("random").Random(0)  # shuffled words: text that compresses no better than prose
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.sample(words, 2000))}) + "\n" for _ in range(200)))
    work = tmp_path / "small-disk"
    work.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(work)], capture_output=True).returncode == 0
    if not mounted:
        from pipeline import io as pio

        def full(self, schema):
            raise OSError(errno_.ENOSPC, "No space left on device", str(work / "x.parquet"))

        monkeypatch.setattr(pio._FileSink, "_open", full)
    try:
        path = tmp_path / "p.yaml"
        path.write_text(f"name: full\nwork_dir: {work}\nstages:\n  ingest:\n    uses: ingest\n"
                        f"    config: {{sources: [{{name: docs, paths: ['{data}/*.jsonl']}}]}}\n")
        with pytest.raises(PartFailed) as e:
            Runner(load_config(str(path)), use_ray=False, track=False).run()
        message = str(e.value)
        assert message.startswith(f"stage 'ingest' failed on part 00000 ({data / 'docs.jsonl'}): OSError: ")
        assert "No space left on device" in message
        assert message.endswith("; free space there and run again (committed stages are kept, this one restarts)")
        assert "\n" not in message
    finally:
        if mounted:
            subprocess.run(["umount", str(work)], check=True)
