#!/usr/bin/env bash
# Training speed and memory side by side (benchmarks/speed.py): the harness's trainers,
# SpikingJelly's BPTT/SLTT/OTTT and the ANN limit on the same model and batch, interleaved in
# rounds (thread CPU time at one torch thread by default), plus the meters' overhead, evaluation
# with and without SynOps, and the time one `harness run` spends outside its cell. Sets up .venv
# first if needed. Extra arguments go to benchmarks/speed.py (see --help); results land in
# results/speed/ by default.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" benchmarks/speed.py "$@"
