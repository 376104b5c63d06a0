"""Runs that share a work dir: a second run of the same stage output fails at once naming the
first, a commit never deletes an attempt another running pipeline may read, a killed run's lock
is taken over -- locally (with a real second process) and on S3 (moto's server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.config import load_config
from pipeline.locks import ReaderLease, StageBusy, StageLock, live_readers
from pipeline.runner import Runner
from pipeline import storage as st
from pipeline.storage import Storage
from stages.assets import python_doc_topics

PIPELINE = """
name: locks
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 0.5}}
"""


@pytest.fixture()
def pipeline(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in list(python_doc_topics().values())[:20]))
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(work=tmp_path / "work", data=data))
    return path


def _lmpipe(*args: str) -> subprocess.CompletedProcess:
    """Another lmpipe process (in process: no Ray, so the test stays fast)."""
    code = ("import sys; from pipeline.config import load_config; from pipeline.runner import Runner; "
            "args = sys.argv[1:]; Runner(load_config(args[0]), use_ray=False, track=False).run("
            "only=args[1] if len(args) > 1 else None, force=len(args) > 1)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def _stage_dir(path: Path, stage: str) -> str:
    runner = Runner(load_config(str(path)), use_ray=False, track=False)
    return mf.stage_uri(runner.work_dir, stage, runner.fingerprints()[stage].value)


def test_a_second_run_of_the_same_stage_fails_at_once_naming_the_first(pipeline):
    ingest_dir = _stage_dir(pipeline, "ingest")
    with StageLock(Storage(), ingest_dir, "ingest", run="run-A"):  # this process computes ingest
        started = time.monotonic()
        proc = _lmpipe(str(pipeline))
        assert proc.returncode != 0 and time.monotonic() - started < 60
        assert "StageBusy" in proc.stderr and f"stage 'ingest' ({ingest_dir}) is being computed by another run" in proc.stderr
        assert "pipeline run run-A" in proc.stderr
        assert mf.load_manifest(Storage(), ingest_dir) is None  # nothing was written under the holder
    proc = _lmpipe(str(pipeline))  # released: the next run computes it
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert mf.load_manifest(Storage(), ingest_dir) is not None and not (Path(ingest_dir) / "_lock.json").exists()


def test_the_lock_of_a_killed_run_is_taken_over(pipeline):
    ingest_dir = _stage_dir(pipeline, "ingest")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(ingest_dir).mkdir(parents=True)
    lease = {"host": __import__("socket").gethostname(), "pid": dead.pid, "run": "killed", "started": time.time(), "heartbeat": time.time()}
    (Path(ingest_dir) / "_lock.json").write_text(json.dumps(lease))
    proc = _lmpipe(str(pipeline))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_commit_keeps_the_attempt_another_running_pipeline_may_read(pipeline):
    assert _lmpipe(str(pipeline)).returncode == 0
    ingest_dir = Path(_stage_dir(pipeline, "ingest"))
    first = mf.load_manifest(Storage(), str(ingest_dir))["attempt"]
    with ReaderLease(Storage(), str(ingest_dir.parent.parent), [str(ingest_dir)], run="reader"):  # a run reading ingest
        proc = _lmpipe(str(pipeline), "ingest")  # --stage ingest --force in another process: a new commit
        assert proc.returncode == 0, proc.stderr[-2000:]
        second = mf.load_manifest(Storage(), str(ingest_dir))["attempt"]
        assert second != first and (ingest_dir / first).is_dir()  # still there for the reader
    proc = _lmpipe(str(pipeline), "ingest")  # no reader any more: the next commit cleans up
    assert proc.returncode == 0, proc.stderr[-2000:]
    third = mf.load_manifest(Storage(), str(ingest_dir))["attempt"]
    assert sorted(p.name for p in ingest_dir.glob("attempt-*")) == [third]


def test_locks_and_reader_leases_work_on_s3(s3_server):
    from tests.conftest import make_bucket

    make_bucket(s3_server, "locks")
    storage = Storage({"s3": {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}})
    stage_dir = "s3://locks/work/ingest/abc"
    first = StageLock(storage, stage_dir, "ingest", run="A")
    first.acquire()
    with pytest.raises(StageBusy, match="pipeline run A"):
        StageLock(storage, stage_dir, "ingest", run="B").acquire()
    first.release()
    with StageLock(storage, stage_dir, "ingest", run="B"):
        assert storage.exists(f"{stage_dir}/_lock.json")
    assert not storage.exists(f"{stage_dir}/_lock.json")
    with ReaderLease(storage, "s3://locks/work", [stage_dir], run="R") as lease:
        assert [r["run"] for r in live_readers(storage, "s3://locks/work", stage_dir)] == ["R"]
        assert live_readers(storage, "s3://locks/work", stage_dir, ignore=lease.id) == []
    assert live_readers(storage, "s3://locks/work", stage_dir) == []


def test_the_attempt_a_failed_check_points_to_survives_the_next_run(tmp_path):
    """ingest's error says "see the quarantine dataset of this attempt": a rerun deleted it."""
    from pipeline.runner import StageFailed

    data = tmp_path / "data"
    data.mkdir()
    (data / "bad.jsonl").write_text('{"body": "no text field"}\n' * 3)
    path = tmp_path / "p.yaml"
    path.write_text(f"name: q\nwork_dir: {tmp_path / 'work'}\nstages:\n  ingest:\n    uses: ingest\n"
                    f"    config: {{sources: [{{name: docs, paths: ['{data}/*.jsonl']}}]}}\n")
    failed = []
    for _ in range(2):
        with pytest.raises(StageFailed, match="all 3 records were quarantined") as e:
            Runner(load_config(str(path)), use_ray=False, track=False).run()
        failed.append(str(e.value).split("kept in ")[1].split(" until")[0])
    assert failed[0] != failed[1] and all(Path(f, "quarantine").is_dir() for f in failed)  # both still there to inspect

    marker = json.loads(Path(failed[0], "_FAILED.json").read_text())
    assert "all 3 records were quarantined" in marker["error"] and marker["manifest"]["counts"]["quarantined"] == {"missing_text": 3}


# -- fencing: a holder stopped past its lease neither commits nor deletes anything of the run
# that took its place ------------------------------------------------------------------------
FENCED = """
name: fenced
work_dir: {work}
{storage}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  gated:
    uses: gated_copy
    inputs: [ingest]
"""
TTL_S = 2.0  # the lease time to live of both runs (LMPIPE_LEASE_TTL_S), so the test takes seconds
RUN = ("import sys, tests.pipeline.gated_stage; from pipeline.config import load_config; from pipeline.runner import Runner; "
       "Runner(load_config(sys.argv[1]), use_ray=False, track=False).run()")


def _run_env(**extra: str) -> dict[str, str]:
    import os

    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]), "LMPIPE_LEASE_TTL_S": str(TTL_S)}
    env.pop("LMPIPE_TEST_GATE", None)
    return {**env, **extra}


def _snapshot(storage: Storage, stage_dir: str, skip: list[str]) -> dict[str, bytes]:
    """Every file of a stage folder (bytes), but the lease machinery's own and those of the
    attempt folders in ``skip``."""
    out = {}
    for uri in storage.find_files(stage_dir):
        name = uri[len(stage_dir) + 1:]
        if name.startswith((".lmpipe-cas", "_lock.json", "_clock-", *(f"{a}/" for a in skip))):
            continue
        out[name] = storage.read_bytes(uri)
    return out


def _stopped_holder_is_fenced(tmp_path: Path, storage: Storage, work: str, storage_yaml: str = "", env: dict | None = None) -> None:
    import os
    import signal

    import tests.pipeline.gated_stage  # noqa: F401  (registers gated_copy for the fingerprints below)

    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in list(python_doc_topics().values())[:10]))
    path = tmp_path / "fenced.yaml"
    path.write_text(FENCED.format(work=work, data=data, storage=storage_yaml))
    gate = tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen([sys.executable, "-c", RUN, str(path)], env=_run_env(LMPIPE_TEST_GATE=str(gate), **(env or {})),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (gate / "started").exists():  # the first run holds gated's lock, mid-part
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        stage_dir = _stage_dir(path, "gated")
        first_attempt = [n for n in storage.ls_dirs(stage_dir) if n.startswith("attempt-")]  # its own, if it wrote any yet
        os.kill(first.pid, signal.SIGSTOP)
        time.sleep(TTL_S + 2)  # its lease goes stale: no heartbeat while it is stopped

        second = subprocess.run([sys.executable, "-c", RUN, str(path)], env=_run_env(**(env or {})),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "took over the lock of pid" in second.stderr
        committed = mf.load_manifest(storage, stage_dir)
        assert committed["attempt"] not in first_attempt
        before = _snapshot(storage, stage_dir, skip=first_attempt)
        assert "_manifest.json" in before and any(name.startswith(f"{committed['attempt']}/data/") for name in before)

        (gate / "open").touch()
        os.kill(first.pid, signal.SIGCONT)  # the first run wakes up, its part finishes
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    assert first.returncode != 0
    assert "LeaseLost: lease on gated lost to " in err and "this run's attempt was not committed" in err, err[-3000:]
    after = _snapshot(storage, stage_dir, skip=first_attempt)
    assert after == before  # the second run's commit and attempt, byte for byte
    assert not storage.exists(st.join(stage_dir, "_lock.json"))  # its heartbeat did not write the released lock again
    assert mf.load_manifest(storage, stage_dir)["attempt"] == committed["attempt"]
    for uri in mf.dataset_files(committed, stage_dir):
        assert storage.exists(uri)

    # what the stopped run left behind is a superseded attempt: `lmpipe gc` removes it, and only it
    from pipeline.cleanup import apply_gc, plan_gc

    plan = plan_gc([load_config(str(path))])
    assert [r.uri for r in plan.remove] == [st.join(stage_dir, a) for a in first_attempt if storage.exists(st.join(stage_dir, a))]
    apply_gc(plan)
    assert _snapshot(storage, stage_dir, skip=[]) == before


def test_a_stopped_holder_neither_commits_nor_deletes_anything_of_the_run_that_took_over(tmp_path):
    _stopped_holder_is_fenced(tmp_path, Storage(), str(tmp_path / "work"))


def test_a_stopped_holder_is_fenced_on_s3(tmp_path, s3_env):
    from tests.conftest import make_bucket

    s3_server = s3_env
    make_bucket(s3_server, "fenced")
    storage = Storage({"s3": {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}})
    yaml = (f"storage:\n  s3:\n    endpoint_url: {s3_server['endpoint_url']}\n    key: ${{AWS_ACCESS_KEY_ID}}\n"
            f"    secret: ${{AWS_SECRET_ACCESS_KEY}}\n")
    env = {"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": s3_server["region"]}
    _stopped_holder_is_fenced(tmp_path, storage, "s3://fenced/work", yaml, env)


def test_staleness_is_read_on_the_storages_clock_not_the_holders(tmp_path):
    """A holder whose clock is a day ahead or behind: only the lock file's age on the storage counts."""
    import os
    import socket

    from pipeline.locks import LOCK_FILE

    stage_dir = tmp_path / "work" / "s" / "0123456789abcdef"
    stage_dir.mkdir(parents=True)
    lock_file = stage_dir / LOCK_FILE
    skewed = {"host": "elsewhere", "pid": 1, "run": "skewed", "token": "t", "started": time.time() - 86400, "heartbeat": time.time() - 86400}
    lock_file.write_text(json.dumps(skewed))  # just written: live, whatever its times say
    with pytest.raises(StageBusy, match="pipeline run skewed"):
        StageLock(Storage(), str(stage_dir), "s", ttl_s=5).acquire()
    ahead = {**skewed, "started": time.time() + 86400, "heartbeat": time.time() + 86400, "host": socket.gethostname() + "-other"}
    lock_file.write_text(json.dumps(ahead))
    old = time.time() - 60
    os.utime(lock_file, (old, old))  # not renewed for a minute on the storage's clock: stale
    with StageLock(Storage(), str(stage_dir), "s", ttl_s=5) as lock:
        assert json.loads(lock_file.read_text())["token"] == lock.token


def test_a_lock_taken_over_is_lost_to_its_new_holder_and_never_deleted_by_the_old_one(tmp_path):
    from pipeline.locks import LeaseLost

    storage = Storage()
    stage_dir = str(tmp_path / "work" / "s" / "0123456789abcdef")
    first = StageLock(storage, stage_dir, "s", run="first", ttl_s=60)
    first.acquire()
    stale = storage.read_versioned(f"{stage_dir}/_lock.json")
    second = StageLock(storage, stage_dir, "s", run="second", ttl_s=60)
    assert second.lease.take_over(stale.version)  # as if the first had stopped for a minute
    assert not StageLock(storage, stage_dir, "s", run="third", ttl_s=60).lease.take_over(stale.version)  # only one takes it over
    with pytest.raises(LeaseLost, match=r"lease on s lost to pid \d+ on .*pipeline run second; this run's attempt was not committed"):
        first.renew()
    with pytest.raises(LeaseLost):
        first.commit({"format": 2})
    first.release()
    assert json.loads(Path(stage_dir, "_lock.json").read_text())["token"] == second.token  # still the second's
    assert not Path(stage_dir, "_manifest.json").exists()
    second.release()
    assert not Path(stage_dir, "_lock.json").exists()


def test_a_commit_never_overwrites_one_made_after_the_lock_was_taken(tmp_path):
    from pipeline.locks import LeaseLost

    storage = Storage()
    stage_dir = str(tmp_path / "work" / "s" / "0123456789abcdef")
    with StageLock(storage, stage_dir, "s", ttl_s=60) as lock:
        storage.write_json_atomic(f"{stage_dir}/_manifest.json", {"attempt": "attempt-other"})  # another run's commit
        with pytest.raises(LeaseLost, match="another run committed .* meanwhile; this run's attempt was not committed"):
            lock.commit({"attempt": "attempt-mine"})
    assert storage.read_json(f"{stage_dir}/_manifest.json") == {"attempt": "attempt-other"}
