"""The harness's test kit, enabled for these tests: its fixtures (``harness_run_matrix``, ...) and
what its contract suites need."""

pytest_plugins = ["harness.testing"]
