"""Check what a person sees in the MLflow UI for a pipeline's store, in a real browser.

    python scripts/check_mlflow_ui.py --store work/demo/mlflow.db --out ui-check/

Starts ``mlflow server`` on 127.0.0.1 over a copy of the store (the original is never touched),
drives headless Chromium through the DevTools protocol (``--remote-debugging-pipe``: no driver,
no extra Python package) with a fresh profile, and for each page records the final URL, a
screenshot and the page's text under ``--out``. It checks:

1. the experiment carries ``mlflow.experimentKind = custom_model_development``;
2. the experiment's link with ``?workflowType=machine_learning`` opens the model-training view
   (its training runs, the pipeline's stage runs among them);
3. the experiment's Models tab lists one LoggedModel per evaluated checkpoint (a checkpoint is a
   step of the evaluate run's metrics; each step's scores are linked to exactly one model), by name;
4. a LoggedModel's page shows its name and the evaluation metrics linked to it.

It also records, without failing, which view the plain experiment link opens in a fresh browser:
MLflow 3.17 takes the view from its sidebar switch (remembered per browser, GenAI by default)
or the URL's ``workflowType``, not from the experiment's tag. Exit status 0 when every check
holds; each failure is printed on one line.

Needs ``chromium`` (Debian: ``apt-get install chromium``) or ``--browser PATH``; it is not part of
the test suite, whose machines have no browser. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ML_VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class Browser:
    """Headless Chromium over ``--remote-debugging-pipe``: CDP messages are JSON, each ended by a NUL
    byte, written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, executable: str, profile: str, width: int = 1400, height: int = 1000):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes():  # in the child: its fd 3 reads our commands, fd 4 carries its answers
            import fcntl

            high_r, high_w = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # copies above 10 first: either pipe end may itself be fd 3 or 4
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-pipe", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"],
            # fds 3 and 4 survive the close_fds that follows preexec_fn in the child
            pass_fds=(3, 4), preexec_fn=wire_pipes, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  session=True)

    def call(self, method: str, params: Optional[dict] = None, session: bool = False, timeout: float = 60.0) -> dict:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method}: no answer from the browser within {timeout:.0f}s")
            import select

            ready, _, _ = select.select([self._from_browser], [], [], 1.0)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{method}: the browser exited (status {self.proc.poll()})")
                self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = 120.0) -> dict[str, Any]:
        """Navigate and wait (bounded) until the page's text contains ``ready`` and stops changing."""
        self.call("Page.navigate", {"url": url}, session=True)
        deadline, last, stable = time.monotonic() + timeout, None, 0
        while time.monotonic() < deadline:
            time.sleep(1.0)
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            stable = stable + 1 if text == last else 0
            last = text
            if ready in text and stable >= 3:
                break
        shot = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"])
        return {"url": self.evaluate("location.href"), "title": self.evaluate("document.title"), "text": last or "",
                "links": self.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))") or [],
                "screenshot": shot, "ready": ready in (last or "")}

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def store_facts(db: str, experiment: str) -> dict[str, Any]:
    """What the UI should show, read from the store itself: the experiment, its tags, its
    LoggedModels, and per evaluated checkpoint (a step of the evaluate runs' metrics) the models
    its scores are linked to."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    row = conn.execute("select experiment_id from experiments where name = ?", (experiment,)).fetchone()
    if row is None:
        raise SystemExit(f"{db}: no experiment named {experiment!r}")
    exp_id = str(row[0])
    tags = dict(conn.execute("select key, value from experiment_tags where experiment_id = ?", (exp_id,)).fetchall())
    models = dict(conn.execute("select model_id, name from logged_models where experiment_id = ?", (exp_id,)).fetchall())
    evaluate_runs = [r[0] for r in conn.execute("select run_uuid from runs where experiment_id = ? and name = 'evaluate'", (exp_id,))]
    steps: dict[int, set[str]] = {}
    for run in evaluate_runs:
        for step, model in conn.execute("select distinct metric_step, model_id from logged_model_metrics where run_id = ?", (run,)):
            steps.setdefault(int(step), set()).add(model)
        for (step,) in conn.execute("select distinct step from metrics where run_uuid = ? and key like '%/acc'", (run,)):
            steps.setdefault(int(step), set())
    runs = [r[0] for r in conn.execute("select run_uuid from runs where experiment_id = ? and lifecycle_stage = 'active'", (exp_id,))]
    nested = {r[0] for r in conn.execute("select run_uuid from tags where key = 'mlflow.parentRunId'")}
    top = [name for run, name in conn.execute("select run_uuid, name from runs where experiment_id = ? and lifecycle_stage = 'active'",
                                              (exp_id,)) if run not in nested]
    return {"experiment_id": exp_id, "tags": tags, "models": models, "checkpoints": steps, "runs": len(runs), "pipeline_runs": top}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the pipeline's SQLite MLflow store (work_dir/mlflow.db)")
    ap.add_argument("--experiment", default="lmpipe")
    ap.add_argument("--out", default="mlflow-ui-check", help="folder for screenshots, page texts and the report")
    ap.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server, and for each page")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lmpipe-ui-check-"))
    db = work / "mlflow.db"
    shutil.copyfile(args.store, db)  # the server may migrate a store; never the original
    facts = store_facts(str(db), args.experiment)
    failures: list[str] = []
    report: dict[str, Any] = {"store": args.store, "experiment_id": facts["experiment_id"], "pages": {}}

    if facts["tags"].get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        failures.append(f"experiment {args.experiment}: tag {EXPERIMENT_KIND[0]} is {facts['tags'].get(EXPERIMENT_KIND[0])!r}, "
                        f"not {EXPERIMENT_KIND[1]!r}")
    for step, linked in sorted(facts["checkpoints"].items()):
        if len(linked) != 1:
            failures.append(f"evaluated checkpoint at step {step}: its scores are linked to {len(linked)} LoggedModels, not one")
    evaluated = sorted({m for linked in facts["checkpoints"].values() for m in linked})

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = open(work / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    browser = None
    try:
        wait_for(f"{base}/health", server, args.timeout)
        browser = Browser(args.browser, str(work / "profile"))
        exp = facts["experiment_id"]
        pages = {
            "experiment_default": (f"{base}/#/experiments/{exp}", args.experiment),
            # ready once the runs have loaded: the list says "0 matching runs" while it waits for them
            "experiment_training_view": (f"{base}/#/experiments/{exp}?{ML_VIEW}", f"{facts['runs']} matching runs"),
            "models": (f"{base}/#/experiments/{exp}/models?{ML_VIEW}", facts["models"][evaluated[0]] if evaluated else args.experiment),
        }
        if evaluated:
            pages["logged_model"] = (f"{base}/#/experiments/{exp}/models/{evaluated[-1]}?{ML_VIEW}", facts["models"][evaluated[-1]])
        seen = {}
        for name, (url, ready) in pages.items():
            page = browser.open(url, ready, args.timeout)
            (out / f"{name}.png").write_bytes(page.pop("screenshot"))
            (out / f"{name}.txt").write_text(page["text"])
            view = ("training" if any(ML_VIEW in link for link in page["links"])
                    else "genai" if any("workflowType=genai" in link for link in page["links"]) else "unknown")
            seen[name] = {**page, "view": view}
            report["pages"][name] = {"url": url, "final_url": page["url"], "title": page["title"], "view": view, "ready": page["ready"]}

        training = seen["experiment_training_view"]
        if training["view"] != "training":
            failures.append(f"{pages['experiment_training_view'][0]}: opened the {training['view']} view, not model training")
        # the pipeline runs at the top, their stage runs nested under them (collapsed), all counted
        missing_runs = [r for r in facts["pipeline_runs"] if r not in training["text"]]
        if missing_runs:
            failures.append(f"{pages['experiment_training_view'][0]}: the runs list does not show the pipeline runs {missing_runs}")
        if f"{facts['runs']} matching runs" not in training["text"]:
            failures.append(f"{pages['experiment_training_view'][0]}: the runs list does not count {facts['runs']} runs")
        listed = [m for m, n in facts["models"].items() if n in seen["models"]["text"]]
        if seen["models"]["view"] != "training":
            failures.append(f"{pages['models'][0]}: opened the {seen['models']['view']} view, not model training")
        for m in evaluated:
            if m not in listed:
                failures.append(f"{pages['models'][0]}: LoggedModel {facts['models'][m]} ({m}) is not listed")
        report["evaluated_checkpoints"] = {str(s): [facts["models"][m] for m in sorted(ms)] for s, ms in sorted(facts["checkpoints"].items())}
        report["models_listed"] = sorted(facts["models"][m] for m in listed)
        if evaluated:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            keys = [k for (k,) in conn.execute("select distinct metric_name from logged_model_metrics where model_id = ?", (evaluated[-1],))]
            page = seen["logged_model"]
            if facts["models"][evaluated[-1]] not in page["text"]:
                failures.append(f"{pages['logged_model'][0]}: the page does not name the model")
            shown = [k for k in keys if k in page["text"]]
            if not shown:
                failures.append(f"{pages['logged_model'][0]}: none of its {len(keys)} linked metrics is shown")
            report["logged_model_metrics_shown"] = f"{len(shown)} of {len(keys)}"
        report["default_view"] = seen["experiment_default"]["view"]
    finally:
        if browser is not None:
            browser.close()
        if server.poll() is None:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
        server_log.close()
        shutil.rmtree(work, ignore_errors=True)

    report["failures"] = failures
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "pages"}, indent=2))
    for name, page in report["pages"].items():
        print(f"{name}: {page['view']} view, {page['final_url']} ({page['title']})")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
