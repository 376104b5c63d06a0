"""Transient S3 failures (throttling and 5xx, injected by a proxy in front of moto's server):
reads and writes retry with backoff; nothing is lost or duplicated."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


from pipeline.config import load_config
from pipeline.runner import Runner
from tests.conftest import make_bucket, s3_filesystem

SLOW_DOWN = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class FaultyProxy:
    """Forwards to an S3 endpoint; answers every ``every``-th request with 503 SlowDown or 500,
    at most ``limit`` times (bounded, deterministic)."""

    def __init__(self, target: str, every: int = 4, limit: int = 200):
        self.target = urlparse(target)
        self.every, self.limit = every, limit
        self.seen = self.injected = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.seen += 1
                    fail = proxy.seen % proxy.every == 0 and proxy.injected < proxy.limit
                    if fail:
                        proxy.injected += 1
                        status = 503 if proxy.injected % 2 else 500
                if fail:
                    payload = SLOW_DOWN if status == 503 else b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "transfer-encoding")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length with no body: pass it through
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _config(endpoint: str, work: str, tmp_path, name: str) -> str:
    return f"""
name: {name}
work_dir: {work}
mlflow: {{tracking_uri: "sqlite:///{tmp_path}/{name}.db"}}
storage:
  s3:
    endpoint_url: {endpoint}
    key: ${{AWS_ACCESS_KEY_ID}}
    secret: ${{AWS_SECRET_ACCESS_KEY}}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: news, paths: ["s3://faultdata/news/*.jsonl"]}}]
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 0.5}}
"""


def _outputs(fs, prefix: str) -> dict:
    fs.invalidate_cache()
    out = {}
    for m in fs.glob(f"{prefix}/*/*/_manifest.json"):
        manifest = json.loads(fs.cat(m))
        stage_dir = m.rsplit("/", 1)[0]
        files = {}
        for ds, info in manifest["datasets"].items():
            for f in info["files"]:
                files[f"{ds}/{f['path'].split('/', 1)[1]}"] = hashlib.sha256(fs.cat(f"{stage_dir}/{f['path']}")).hexdigest()
        out[manifest["stage"]] = (manifest["counts"], files)
    return out


def test_transient_s3_failures_are_retried_without_loss(ray_local, s3_env, pipeline_file, tmp_path):
    from stages.assets import news_articles

    make_bucket(s3_env, "faultdata")
    fs = s3_filesystem(s3_env)
    articles = news_articles()
    for i in range(6):
        fs.pipe(f"faultdata/news/news-{i}.jsonl", "".join(json.dumps(a) + "\n" for a in articles[i::6]).encode())

    Runner(load_config(pipeline_file(_config(s3_env["endpoint_url"], "s3://faultdata/clean", tmp_path, "clean"), "clean.yaml"))).run()
    with FaultyProxy(s3_env["endpoint_url"], every=4) as proxy:
        Runner(load_config(pipeline_file(_config(proxy.url, "s3://faultdata/faulty", tmp_path, "faulty"), "faulty.yaml"))).run()
    assert proxy.injected >= 10, f"only {proxy.injected} faults were injected in {proxy.seen} requests"

    clean, faulty = _outputs(fs, "faultdata/clean"), _outputs(fs, "faultdata/faulty")
    assert set(clean) == set(faulty) == {"ingest", "sample"}
    for stage in clean:
        assert faulty[stage][0] == clean[stage][0]  # exact counts: nothing lost, nothing duplicated
        assert faulty[stage][1] == clean[stage][1]  # byte-identical files
    assert clean["ingest"][0]["rows_in"] == 3824
