"""``ray start`` for a second Ray node on this machine that joins a head listening on 127.0.0.1,
and listens on 127.0.0.1 itself:

    python tests/clusters/ray_worker_node.py --address 127.0.0.1:PORT [ray start's options]

The tests' Ray nodes stay on the loopback (tests/conftest.py). A joining node needs Ray's cluster
switch on, and with it on, ``ray start`` turns 127.0.0.1, in ``--address`` and
``--node-ip-address`` alike, into the machine's network address; here it keeps the loopback."""

from __future__ import annotations

import os
import sys

from pipeline.local_ray import LOOPBACK_SWITCH  # imports no Ray

os.environ[LOOPBACK_SWITCH] = "1"  # before Ray reads it: worker nodes are refused without it

from ray._private import services  # noqa: E402

services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given

from ray.scripts.scripts import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["ray", "start", "--block", "--node-ip-address", "127.0.0.1", *sys.argv[1:]]
    sys.exit(main())
