"""``harness run`` in a process of its own, with the Ray tests' plugins (a real driver a test can
interrupt): ``python tests/ray_driver.py [--two-nodes] <harness run arguments>``.

``--two-nodes`` first starts a Ray cluster of two nodes on this machine (Ray's
``cluster_utils.Cluster``, one CPU each) and runs the matrix on it with ``--address``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only, before Ray is imported
sys.path.insert(0, str(Path(__file__).parent))

import ray  # noqa: E402
import ray_plugins  # noqa: E402

import harness.registry as registry_module  # noqa: E402


def main(argv: list[str]) -> int:
    ray.cloudpickle.register_pickle_by_value(ray_plugins)
    real = registry_module.get_plugin_manager
    registry_module.get_plugin_manager = lambda **kw: real(extra_plugins=[(ray_plugins.SlowTrainers(), "test_slow")], **kw)
    from harness.cli import main as harness_main

    if argv[:1] != ["--two-nodes"]:
        return harness_main(["run", *argv])
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        return harness_main(["run", *argv[1:], "--address", cluster.address])
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(int(main(sys.argv[1:])))
