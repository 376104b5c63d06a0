"""An address where something other than Ray listens fails in seconds, naming the address: Ray
retried it for minutes (``run --address``), or 41 s without naming it (``submit HOST:PORT``,
which Ray reads as a GCS address)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest

from pipeline import preflight
from tests.pipeline.test_cli_errors import _pipeline


@pytest.fixture
def web_server():
    """Something that is not Ray on 127.0.0.1: a plain HTTP server (as a dashboard or MLflow is)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=170)
    return proc, time.monotonic() - started


def test_run_at_a_port_where_a_web_server_listens_fails_in_seconds(tmp_path, web_server):
    proc, took = _cli("run", _pipeline(tmp_path, str(tmp_path / "w")), "--address", web_server)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and f"{web_server} is not the Ray cluster: a web server answered" in last, proc.stderr[-2000:]
    assert took < 60


def test_submit_to_host_port_without_a_scheme_names_the_address_in_seconds(tmp_path, web_server):
    proc, took = _cli("submit", _pipeline(tmp_path, str(tmp_path / "w")), "--address", web_server, "--no-wait")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    host = web_server.split(":")[0]
    assert f"{web_server} is not the Ray cluster" in last and f"--address http://{host}:8265" in last
    assert took < 60


def test_a_real_ray_cluster_passes_the_check(ray_local):
    gcs = ray_local.get_runtime_context().gcs_address
    preflight.check_ray_address(gcs)
    preflight.check_dashboard_address(gcs)
