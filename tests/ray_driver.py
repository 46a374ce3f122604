"""``harness run`` in a process of its own, with the Ray tests' plugins (a real driver a test can
interrupt): ``python tests/ray_driver.py [--two-nodes] <harness run arguments>``.

Ray is imported by the harness itself, as in a plain ``harness run`` (the test plugins are
registered with Ray's pickler once the executor has started Ray). ``--two-nodes`` first starts a
Ray cluster of two nodes on this machine (Ray's ``cluster_utils.Cluster``, one CPU each, on
loopback) and runs the matrix on it with ``--address``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ray_plugins  # noqa: E402

import harness.registry as registry_module  # noqa: E402
from harness import ray_executor  # noqa: E402


def main(argv: list[str]) -> int:
    real_pm = registry_module.get_plugin_manager
    registry_module.get_plugin_manager = lambda **kw: real_pm(extra_plugins=[(ray_plugins.SlowTrainers(), "test_slow")], **kw)
    real_start = ray_executor.RayExecutor.start

    def start(self) -> None:
        real_start(self)
        import ray

        ray.cloudpickle.register_pickle_by_value(ray_plugins)  # the workers need not import this directory

    ray_executor.RayExecutor.start = start
    from harness.cli import main as harness_main

    if argv[:1] != ["--two-nodes"]:
        return harness_main(["run", *argv])
    os.environ.setdefault(ray_executor.LOOPBACK_ENV, "0")
    import ray
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
