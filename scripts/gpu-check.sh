#!/usr/bin/env bash
# One-shot check of the CUDA path (benchmarks/gpu_check.py): device placement, host syncs,
# resume, CPU parity, memory against T, determinism, autocast, speed against SpikingJelly and the
# ANN limit, the device of each process.
#
#   scripts/gpu-check.sh [--device cuda|cpu] [--out DIR] [--only CHECK] [--wheels DIR]
#
# Meant for a GPU machine that has PyTorch, pluggy, rich, matplotlib and scikit-learn but maybe not
# this project, MLflow or tonic, and no network: with --wheels DIR it first installs the wheels in
# DIR (e.g. a wheel of this project made with `pip wheel --no-deps -w DIR .`) into a scratch
# directory; otherwise, unless the project is importable already (its .venv, or an install), it
# installs the working tree there without dependencies or downloads. `--device cpu` is the dry run
# the test suite does. Results: DIR/gpu-check.md and DIR/gpu-check.json (default results/gpu-check).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
installed() { "$PY" -c 'import importlib.metadata as m, snn_harness_plugins; m.distribution("snn-harness")' >/dev/null 2>&1; }

scratch="${TMPDIR:-/tmp}/snn-harness-gpu-check"
if [ -n "$wheels" ]; then
  echo "gpu-check: installing the wheels in $wheels into $scratch/site" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$scratch/site" "$wheels"/*.whl
  export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! installed; then
  # The working tree as an installed distribution: its packages linked and its entry points (the
  # built-in plugins) declared, read from pyproject.toml. No build step, so no setuptools of a
  # particular version is needed (an old one rejects this project's metadata).
  echo "gpu-check: linking the working tree into $scratch/site as an installed distribution" >&2
  rm -rf "$scratch/site"
  mkdir -p "$scratch/site"
  "$PY" - "$ROOT" "$scratch/site" <<'PYEOF'
import os, re, sys, tomllib
root, site = sys.argv[1:]
project = tomllib.load(open(os.path.join(root, "pyproject.toml"), "rb"))
meta, tool = project["project"], project["tool"]["setuptools"]
if "version" not in meta:  # dynamic: written once, as harness.__version__
    init = open(os.path.join(root, "harness", "__init__.py")).read()
    meta["version"] = re.search(r'^__version__ = "([^"]+)"$', init, re.M).group(1)
for package, path in tool["package-dir"].items():
    if "." not in package:
        os.symlink(os.path.join(root, path), os.path.join(site, package))
info = os.path.join(site, f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info")
os.mkdir(info)
with open(os.path.join(info, "METADATA"), "w") as f:
    f.write(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
with open(os.path.join(info, "entry_points.txt"), "w") as f:
    for group, entries in meta.get("entry-points", {}).items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n")
    f.write("[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in meta.get("scripts", {}).items()))
PYEOF
  export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  installed || { echo "gpu-check: the project cannot be imported from $scratch/site" >&2; exit 4; }
fi
exec "$PY" "$ROOT/benchmarks/gpu_check.py" ${args[@]+"${args[@]}"}
