"""Shared fixtures: one local Ray per test session, pipeline files in tmp folders, real corpora."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.local_ray import LOOPBACK_SWITCH

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("LMPIPE_PROGRESS", "0")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Every Ray of the tests listens on 127.0.0.1 (pipeline/local_ray.py): the session's, each
# ``lmpipe run``'s, and the head nodes that tests start with ``ray start`` (which read this switch
# from the environment). A node that joins a head turns it back on (test_multinode.py).
os.environ.setdefault(LOOPBACK_SWITCH, "0")

# Ray Train's controller polls its workers every 2 s by default: a run's start, every restart and
# its end each wait for a poll. Tests that run Ray Train put this in the environment of the
# processes that host the controller (a test's own Ray, a ``ray start`` node).
RAY_TRAIN_QUICK_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


# The suite runs on two pytest-xdist workers, one test file at a time each (``-n 2 --dist loadfile``
# in pyproject.toml, so a file's module fixtures are built once). The longest files start first:
# started last, one of them would run alone at the end while the other worker idles.
LONGEST_FILES_FIRST = [
    "tests/stages/test_train_ray.py",
    "tests/clusters/test_multinode.py",
    "tests/pipeline/test_cli.py",
    "tests/clusters/test_s3_faults.py",
    "tests/pipeline/test_submit.py",
    "tests/pipeline/test_release.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}

    def order(item) -> int:
        path = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        return rank.get(path, len(rank))

    items.sort(key=order)  # stable: the order within a file and among the rest is kept


@pytest.fixture(scope="session", autouse=True)
def lmpipe_home(tmp_path_factory):
    """The default MLflow store of a pipeline with a remote work_dir lives in $LMPIPE_HOME: the
    tests' own, never the user's ~/.lmpipe."""
    home = tmp_path_factory.mktemp("lmpipe-home")
    previous = os.environ.get("LMPIPE_HOME")
    os.environ["LMPIPE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("LMPIPE_HOME", None)
    else:
        os.environ["LMPIPE_HOME"] = previous


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every in-process test (starting one costs ~5 s)."""
    import ray

    from pipeline import local_ray

    if not ray.is_initialized():
        local_ray.start(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 1024 * 1024)
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
    from stages.demo_data import prepare_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    prepare_demo_data(out)
    return out


_PORTS_GIVEN: set[int] = set()
# Below the kernel's ephemeral range (32768-60999 here, /proc/sys/net/ipv4/ip_local_port_range),
# which the local ends of outgoing connections draw from, and above Ray's worker ports (10002-19999)
PORT_RANGE = (20000, 32767)


def free_port() -> int:
    """A port free on 127.0.0.1 now, never given before by this process, and outside the range that
    connections and other binds to port 0 draw from: a node's ports (its GCS, its agents) are
    chosen before any of them binds, and on 127.0.0.1 a connection of another test, or the same
    port drawn twice, could take one meanwhile."""
    import random
    import socket

    rng = random.Random()
    while True:
        port = rng.randint(*PORT_RANGE)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port


def ray_node_port_args() -> list[str]:
    """Free ports for everything a ``ray start`` node binds, so a node started by a test never
    collides with another Ray on this machine (the session's local Ray, another test's cluster):
    a collision kills the node's dashboard agent and job submission then fails with
    "No available agent to submit job"."""
    names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    args: list[str] = []
    for name in names:
        args += [name, str(free_port())]
    return args


def wait_for_http(url: str, timeout: float = 60.0, proc=None) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def start_process(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server (ray start, mlflow server, moto) in its own process group, output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the server's whole process group (its workers included): SIGTERM, then SIGKILL after
    ``grace_s``. Never ``ray stop`` or ``pkill``: they would stop every other Ray on this machine too."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# A ``ray start --block`` node drains for longer than 10 s on SIGTERM (every test cluster's
# teardown waited the full 10 s); its files are the test's own, so it is killed sooner.
RAY_NODE_GRACE_S = 2.0


@contextlib.contextmanager
def server_process(cmd: list[str], log: Path, ready_url: str, env: dict | None = None, timeout: float = 60.0, grace_s: float = 10.0):
    """Start a server, wait until ``ready_url`` answers, stop it on exit."""
    proc = start_process(cmd, log, env)
    try:
        wait_for_http(ready_url, timeout=timeout, proc=proc)
        yield proc
    finally:
        stop_process(proc, grace_s)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint: moto's server on 127.0.0.1 (no AWS involved)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with server_process([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], tmp_path_factory.mktemp("moto") / "moto.log", endpoint):
        yield {"endpoint_url": endpoint, "key": "testing-key", "secret": "testing-secret", "region": "us-east-1"}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials through the environment, as users should pass them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server["region"])
    return s3_server


def s3_filesystem(s3: dict):
    """An s3fs filesystem on the test endpoint, with explicit credentials."""
    import s3fs

    return s3fs.S3FileSystem(key=s3["key"], secret=s3["secret"], client_kwargs={"endpoint_url": s3["endpoint_url"]})


def make_bucket(s3: dict, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint_url"], aws_access_key_id=s3["key"],
                          aws_secret_access_key=s3["secret"], region_name=s3["region"])
    client.create_bucket(Bucket=bucket)
