"""A hard per-page time limit for extractors: they run in a worker process that is killed when a
page takes too long.

A signal-based timeout (SIGALRM raising in Python) cannot stop C code that loops (a parser, a
regular expression): the handler runs only when control returns to the interpreter. A separate
process can always be killed. ``ExtractorProcess`` keeps one worker process per stage worker (an
actor), streams a batch of pages to it, and reads one result per page as it finishes; when no
result comes within ``timeout`` seconds of the previous one, the worker is killed (SIGKILL), the
page gets ``extract_timeout``, a fresh worker starts, and the rest of the batch goes to it. A
worker that dies (a crash, the memory limit) costs the page it was on ``extract_crashed``.

Protocol (pipes, length-prefixed, no pickles): parent -> worker, one batch:
``!I`` page count, then per page ``!III`` lengths of payload, content type, declared charset and
the three byte strings. Worker -> parent, per page: ``!BII`` status, two lengths, two byte
strings (ok: text and a JSON of charset/source; error: reason and detail). Status 255 = ready.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from stages.web import extract_worker  # imported so that its code is part of the stage's code digest
from stages.web.protocol import COUNT, EXTRACT_CRASHED, EXTRACT_TIMEOUT, OK, PAGE, READY, RESULT

@dataclass(frozen=True)
class PageResult:
    reason: Optional[str]  # None: extracted
    text: str = ""
    charset: Optional[str] = None
    charset_source: Optional[str] = None
    detail: str = ""


class _Died(Exception):
    pass


class _TimedOut(Exception):
    pass


class ExtractorProcess:
    """The parent side: one worker process, restarted after a kill."""

    def __init__(self, spec: dict[str, Any], timeout: float, start_timeout: float = 180.0):
        self.spec = spec
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.buf = b""
        self.restarts = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        repo = str(Path(__file__).resolve().parents[2])  # the folder holding the stages package
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
        # -c, not -m: the module is already imported by its package, which -m warns about
        code = f"from {extract_worker.__name__} import worker_main; import json, sys; worker_main(json.loads(sys.argv[1]))"
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(self.spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self.buf = b""
        try:
            status, a, b = self._result(time.monotonic() + self.start_timeout)
        except (_Died, _TimedOut) as e:
            self.close()
            raise RuntimeError(f"the extraction worker did not start ({type(e).__name__.strip('_')}); its errors are in the"
                               f" stage's log") from None
        if status != READY:
            self.close()
            raise RuntimeError(f"the extraction worker failed to start: {a.decode(errors='replace')}: {b.decode(errors='replace')}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

    # -- work -------------------------------------------------------------------------------------
    def run(self, pages: list[tuple[bytes, str, str]]) -> list[PageResult]:
        """One result per page (payload, content type, declared charset), in order."""
        results: list[PageResult] = []
        while len(results) < len(pages):
            if self.proc is None or self.proc.poll() is not None:
                self.close()
                self.start()
            todo = pages[len(results):]
            try:
                self._send(todo)
                while len(results) < len(pages):
                    status, a, b = self._result(time.monotonic() + self.timeout)
                    if status == OK:
                        meta = json.loads(b)
                        results.append(PageResult(None, a.decode("utf-8"), meta["charset"], meta["source"]))
                    else:
                        results.append(PageResult(a.decode(), detail=b.decode("utf-8", "replace")))
            except _TimedOut:
                results.append(PageResult(EXTRACT_TIMEOUT, detail=f"no result within {self.timeout:g} s: the worker was killed"))
                self._restart()
            except _Died:
                code = self.proc.poll() if self.proc else None
                results.append(PageResult(EXTRACT_CRASHED, detail=f"the extraction worker died (exit status {code}) on this page"))
                self._restart()
        return results

    def _restart(self) -> None:
        self.close()
        self.restarts += 1

    def _send(self, pages: list[tuple[bytes, str, str]]) -> None:
        chunks = [COUNT.pack(len(pages))]
        for payload, content_type, charset in pages:
            ct, cs = (content_type or "").encode(), (charset or "").encode()
            chunks += [PAGE.pack(len(payload), len(ct), len(cs)), payload, ct, cs]
        try:
            self.proc.stdin.write(b"".join(chunks))
        except (BrokenPipeError, OSError):
            raise _Died() from None

    def _read(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise _TimedOut()
            chunk = os.read(fd, max(n - len(self.buf), 1 << 16))
            if not chunk:
                raise _Died()
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _result(self, deadline: float) -> tuple[int, bytes, bytes]:
        status, la, lb = RESULT.unpack(self._read(RESULT.size, deadline))
        return status, self._read(la, deadline), self._read(lb, deadline)
