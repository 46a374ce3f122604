"""``harness run`` in a process of its own, with the Ray tests' plugins (a real driver a test can
interrupt): ``python tests/ray_driver.py <harness run arguments>``.

Ray is imported by the harness itself, as in a plain ``harness run`` (the test plugins are
registered with Ray's pickler once the executor has started Ray).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import ray_plugins  # noqa: E402

import harness.registry as registry_module  # noqa: E402
from harness import ray_executor  # noqa: E402


def main(argv: list[str]) -> int:
    real_pm = registry_module.get_plugin_manager
    registry_module.get_plugin_manager = lambda **kw: real_pm(extra_plugins=[(ray_plugins.RayTestPlugins(), "test_slow")], **kw)
    real_start = ray_executor.RayExecutor.start

    def start(self) -> None:
        real_start(self)
        import ray

        ray.cloudpickle.register_pickle_by_value(ray_plugins)  # the workers need not import this directory

    ray_executor.RayExecutor.start = start
    from harness.cli import main as harness_main

    return harness_main(["run", *argv])


if __name__ == "__main__":
    sys.exit(int(main(sys.argv[1:])))
