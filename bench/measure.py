"""Measuring helpers shared by the scale benchmarks (tokenize_scale.py, pipeline_scale.py): a moto S3
server with a byte-counting TCP proxy in front of it, and peak RSS of this process's Ray workers.

Bytes are counted on the wire by the proxy (HTTP bodies and headers of every S3 request of the driver
and the workers), so no client library needs patching and every reader is measured alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator


class CountingProxy:
    """TCP proxy 127.0.0.1:port -> target; counts bytes each way (down = storage -> clients)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.down = 0
        self.up = 0
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        async def pipe(reader, writer, down: bool):
            try:
                while data := await reader.read(1 << 16):
                    if down:
                        self.down += len(data)
                    else:
                        self.up += len(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w):
            try:
                server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_w.close()
                return
            await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            async with server:
                await server.serve_forever()

        asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_behind_proxy(log: Path, buckets: list[str]) -> Iterator[tuple[str, CountingProxy]]:
    """A moto S3 server (its own process group, stopped on exit) and a counting proxy in front of
    it; yields (endpoint of the proxy, proxy) once ``buckets`` exist."""
    import boto3

    port = _free_port()
    with open(log, "w") as out:
        moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proxy = CountingProxy(port)
        endpoint = f"http://127.0.0.1:{proxy.port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                              region_name="us-east-1")
        for bucket in buckets:
            for _ in range(100):
                try:
                    client.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    time.sleep(0.2)
        yield endpoint, proxy
    finally:
        moto.terminate()
        moto.wait()


class WorkerPeakRss:
    """Peak RSS of the Ray worker processes (``ray::…``) below this process, and the CPU seconds
    they used, sampled every ``interval`` s. Only descendants count: the embedded Ray's raylet is a
    child of the driver, so other Ray clusters on a shared machine are never measured. CPU seconds
    are each worker's last sampled user+system time less what it had used when sampling started
    (0 for a worker started later: its start-up is the measured work's cost; up to ``interval`` of
    a worker that exits is missed)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        # RSS less the pages it shares (file-backed and shared memory: the Ray object store that a
        # worker maps counts in its RSS but is allocated once per node)
        self.peak_private = 0
        self.own_cpu_seconds = 0.0  # this sampler thread's CPU, to subtract from the driver's
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu_last[pid] - self._cpu_first[pid] for pid in self._cpu_last)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process(os.getpid())
        first_round = True
        children: list = []
        listed = 0.0
        while not self._stop.is_set():
            started = time.thread_time()
            if time.monotonic() - listed > 1.0:  # listing walks /proc: once a second, not every sample
                try:
                    children = me.children(recursive=True)
                except psutil.Error:
                    children = []
                listed = time.monotonic()
            for p in children:
                try:
                    cmd = p.cmdline()
                    if cmd and cmd[0].startswith("ray::") and not cmd[0].endswith("Agent"):  # not Ray's own agents
                        mem = p.memory_info()
                        self.peak = max(self.peak, mem.rss)
                        self.peak_private = max(self.peak_private, mem.rss - mem.shared)
                        t = p.cpu_times()
                        self._cpu_first.setdefault(p.pid, t.user + t.system if first_round else 0.0)
                        self._cpu_last[p.pid] = t.user + t.system
                except psutil.Error:
                    pass  # a worker that exited between the listing and the read
            first_round = False
            self.own_cpu_seconds += time.thread_time() - started
            self._stop.wait(self.interval)

    def __enter__(self) -> "WorkerPeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def driver_peak_rss() -> int:
    """This process's peak RSS in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
