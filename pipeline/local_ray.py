"""Ray on this machine alone: a run's own Ray (``address: local``) listens on the loopback only.

Left to itself, Ray takes the machine's network address as its node's, so that other machines can
join: its GCS, raylet, object manager, agents and workers then listen on that address and talk to
each other over it. A Ray that lmpipe starts for one run on one machine is never joined (a cluster
is started with ``ray start`` and given as ``--address``), so it has no reason to be reachable from
the network: on 127.0.0.1 nothing outside the machine can connect to it, and nothing it sends
leaves the machine.

Ray picks the loopback where it does not support clusters (Windows, macOS); its switch for that
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read once when Ray is imported) is set both in Ray's
constants, for this process, and in the environment, for the processes it starts."""

from __future__ import annotations

import os
from typing import Any

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Make the next local Ray this process starts take 127.0.0.1 as its node's address."""
    os.environ[LOOPBACK_SWITCH] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start(**ray_init_kwargs: Any):
    """``ray.init(address="local", ...)`` on the loopback only; returns Ray's context."""
    import ray

    loopback_only()
    return ray.init(address="local", **ray_init_kwargs)
