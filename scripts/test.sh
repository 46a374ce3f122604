#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
# The UI test drives a real headless Chromium: Debian's package, installed where we may (root,
# apt); elsewhere that test is skipped with the reason.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test.sh: installing Debian's chromium for the MLflow UI test" >&2
  (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "test.sh: could not install chromium: the UI test will be skipped" >&2
fi
# The test files run in parallel, one pytest-xdist worker per core, a file's tests together in one
# worker (its module fixtures run once; the Ray tests share one cluster). Arguments given here
# come after and win: `-n 0` runs everything in this process.
set +e
"$VENV/bin/python" -m pytest -n "${SNN_HARNESS_TEST_WORKERS:-auto}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
