"""Bounded checks before the long waits: Ray, MLflow servers and S3 endpoints retry for minutes
when their address is wrong (Ray ~5 min, MLflow ~2 min, botocore ~80 s, all silently). A TCP
connect with a short timeout answers at once whether anything listens there, so a wrong address
fails in seconds with a message naming it, and a right one costs one connection."""

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
        check_reachable("the Ray cluster", *target, hint="start it with `ray start --head`, or check --address / ray.address")


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
