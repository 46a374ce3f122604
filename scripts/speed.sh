#!/usr/bin/env bash
# Training speed and memory side by side (benchmarks/speed.py): the harness's bptt and online
# trainers, SpikingJelly's BPTT/SLTT/OTTT and the ANN limit on the same model and batch, plus the
# overhead of the harness's meters and of MLflow tracking. Sets up .venv first if needed. Extra
# arguments go to benchmarks/speed.py (see --help); results land in results/speed/ by default.
# Run it with the machine quiet: the numbers are wall-clock times.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" benchmarks/speed.py "$@"
