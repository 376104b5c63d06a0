"""Bounded checks before the long waits: Ray, MLflow servers and S3 endpoints retry for minutes
when their address is wrong (Ray ~5 min, MLflow ~2 min, botocore ~80 s, all silently). A TCP
connect with a short timeout answers at once whether anything listens there, so a wrong address
fails in seconds with a message naming it, and a right one costs one connection. Ray's own ports
(GCS, Ray client) speak gRPC: something else listening there (a web server, the dashboard) is told
apart by the first bytes it answers to an HTTP/2 greeting, before Ray would retry it for minutes."""

from __future__ import annotations

import logging
import socket
from typing import Optional
from urllib.parse import urlparse

log = logging.getLogger("lmpipe")

CONNECT_TIMEOUT_S = 5.0


class Unreachable(ConnectionError):
    """Nothing answers at an address the pipeline needs."""


def check_reachable(what: str, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S, hint: str = "") -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except socket.timeout:
        reason = f"no answer within {timeout:g} s"
    except OSError as e:
        reason = e.strerror or str(e)
    raise Unreachable(f"cannot reach {what} at {host}:{port} ({reason}){'; ' + hint if hint else ''}")


# An HTTP/2 client greeting and an empty SETTINGS frame: a gRPC server (Ray's GCS, Ray client)
# answers with its own SETTINGS frame (type 4); an HTTP/1 server answers "HTTP/1.1 400 ...".
_H2_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS_FRAME = 4


def _answers_grpc(host: str, port: int, timeout: float) -> Optional[str]:
    """None if the server at host:port answers an HTTP/2 greeting as gRPC servers do; else what it did."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_H2_GREETING)
            answer = b""
            while len(answer) < 9:
                chunk = sock.recv(9 - len(answer))
                if not chunk:
                    break
                answer += chunk
    except socket.timeout:
        return f"it accepted the connection but did not answer within {timeout:g} s"
    except OSError as e:
        return f"it closed the connection ({e.strerror or e})"
    if len(answer) == 9 and answer[3] == _SETTINGS_FRAME:
        return None
    if answer.startswith((b"HTTP/", b"<")):
        return f"a web server answered ({answer.decode('latin-1').splitlines()[0]}...), perhaps a dashboard or MLflow"
    if not answer:
        return "it closed the connection without a word"
    return f"it answered {answer[:9]!r}, not gRPC"


def check_ray_port(what: str, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S, hint: str = "") -> None:
    """Something listens at host:port, and it is a gRPC server (as Ray's GCS and Ray client are)."""
    check_reachable(what, host, port, timeout, hint)
    problem = _answers_grpc(host, port, timeout)
    if problem is not None:
        raise Unreachable(f"{host}:{port} is not {what}: {problem}{'; ' + hint if hint else ''}")


def _host_port(url: str, default_port: int) -> Optional[tuple[str, int]]:
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    if not parsed.hostname:
        return None
    try:
        port = parsed.port or default_port
    except ValueError:  # "host:abc"
        return None
    return parsed.hostname, port


def check_ray_address(address: Optional[str]) -> None:
    """A Ray address given as host:port (GCS) or ray://host:port (client); "auto"/"local" are Ray's."""
    if not address or address in ("auto", "local"):
        return
    target = _host_port(address, 10001 if address.startswith("ray://") else 6379)
    if target:
        check_ray_port("the Ray cluster", *target,
                       hint="start it with `ray start --head`, or check --address / ray.address (host:6379, the GCS, or ray://host:10001)")


def check_dashboard_address(address: str) -> None:
    """``lmpipe submit``/``job``: the dashboard's HTTP address (http://HEAD:8265); an address without
    a scheme is, to Ray, a GCS address (HEAD:6379) -- given the dashboard's port instead, Ray waited
    41 s and never named it."""
    if "://" in address:
        target = _host_port(address, 443 if address.startswith("https://") else 80)
        if target:
            check_reachable("the Ray dashboard", *target, hint="check --address (the dashboard, e.g. http://HEAD:8265)")
        return
    target = _host_port(address, 6379)
    if target:
        check_ray_port("the Ray cluster", *target,
                       hint=f"give the dashboard's address with its scheme, e.g. --address http://{target[0]}:8265")


def check_tracking_uri(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        target = _host_port(uri, 443 if uri.startswith("https://") else 80)
        if target:
            check_reachable("the MLflow tracking server", *target, hint="check mlflow.tracking_uri (or --tracking-uri)")


def check_s3_endpoint(endpoint_url: Optional[str]) -> None:
    """Only a configured endpoint (MinIO, moto, a private S3): AWS's own is left to botocore."""
    if endpoint_url:
        target = _host_port(endpoint_url, 443 if endpoint_url.startswith("https://") else 80)
        if target:
            check_reachable("the S3 endpoint", *target, hint="check storage.s3.endpoint_url")
