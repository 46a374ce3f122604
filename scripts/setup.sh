#!/usr/bin/env bash
# Set-up shared by scripts/benchmark.sh and scripts/test.sh: a virtual environment in .venv with
# the project installed (editable, with the dev extras). Quick when already done: it reinstalls
# only when pyproject.toml changed. Source it; it defines ROOT and VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SNN_HARNESS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "snn-harness needs Python >= 3.11; set PYTHON=/path/to/python3.11 (found: $("$PYTHON" --version 2>&1))" >&2
    exit 4
  fi
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.snn-harness-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $ROOT"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing snn-harness and its dependencies into $VENV (PyTorch takes a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$ROOT[dev]"
  echo "$want" > "$stamp"
fi
