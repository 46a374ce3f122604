"""A second Ray node on this machine, for the Ray tests' cluster: ``python tests/ray_node.py <gcs address>``.

It joins the head node at the address with one CPU and runs until its standard input closes
(the test session's end), then stops its processes. Started inside a private mount namespace
(``unshare -m``) with a tmpfs over a directory, it is a node that does not share that directory
with the driver: the storage of another machine, on this one.
"""

from __future__ import annotations

import signal
import sys


def main(address: str) -> int:
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=address, num_cpus=1, num_gpus=0, object_store_memory=150 * 1024 * 1024,
                       min_worker_port=0, max_worker_port=0, include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None  # not the head node's port
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sys.stdin.read()
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
