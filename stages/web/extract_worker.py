"""The extraction worker process (started by ``sandbox.ExtractorProcess``, which kills it when a
page takes too long): reads batches of pages on stdin, writes one result per page on stdout.
The protocol is described in ``sandbox.py``."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, BinaryIO, Optional

from stages.web.protocol import COUNT, ERROR, EXTRACT_ERROR, OK, PAGE, READY, RESULT, UNDECODABLE_HTML


def _read_exact(stream: BinaryIO, n: int) -> Optional[bytes]:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone (it cannot kill us any more); runs whenever the GIL is free."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def worker_main(spec: dict[str, Any]) -> None:
    from stages.web import extractors

    # the protocol gets its own copy of stdout; fd 1 goes to stderr, so an extractor that prints
    # cannot corrupt a result
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    def send(status: int, a: bytes, b: bytes) -> None:
        out.write(RESULT.pack(status, len(a), len(b)) + a + b)

    try:
        if spec.get("memory_limit_mb"):
            import resource

            limit = int(spec["memory_limit_mb"]) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        extract = extractors.load(spec["extractor"], spec.get("options") or {}, spec.get("function"))
        extract("<html><body><p>warm-up</p></body></html>")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the stage with it
        send(READY, type(e).__name__.encode(), str(e).encode())
        return
    send(READY, b"", b"")
    while True:
        head = _read_exact(stdin, COUNT.size)
        if head is None:
            return  # the parent closed the pipe
        pages = []
        for _ in range(COUNT.unpack(head)[0]):
            lp, lc, ls = PAGE.unpack(_read_exact(stdin, PAGE.size))
            pages.append((_read_exact(stdin, lp), _read_exact(stdin, lc).decode(), _read_exact(stdin, ls).decode()))
        for payload, content_type, charset in pages:
            try:
                decoded = extractors.decode(payload, charset or None)
                text = decoded.text if content_type in extractors.PLAIN_TYPES else extract(decoded.text)
                meta = json.dumps({"charset": decoded.charset, "source": decoded.source}).encode()
                send(OK, text.encode("utf-8", "replace"), meta)
            except extractors.Undecodable as e:
                send(ERROR, UNDECODABLE_HTML.encode(), str(e).encode())
            except Exception as e:  # noqa: BLE001 - one page's failure, reported with its reason
                send(ERROR, EXTRACT_ERROR.encode(), f"{type(e).__name__}: {e}"[:1000].encode("utf-8", "replace"))

