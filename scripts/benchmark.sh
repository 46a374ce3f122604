#!/usr/bin/env bash
# Run the default benchmark matrix (benchmarks.toml), or the matrix given with --matrix.
# Sets up .venv and Fashion-MNIST first if needed. Extra arguments go to `harness run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"

fmnist_present() {
  local d
  for d in data/FashionMNIST/raw /usr/share/datasets/fashion-mnist; do
    if ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1; then return 0; fi
  done
  return 1
}
if ! fmnist_present && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
  sudo_cmd=""
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
  { $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -qq >/dev/null 2>&1 && $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; } \
    || echo "setup: could not install dataset-fashion-mnist; the loader will try torchvision's download" >&2
fi

matrix=benchmarks.toml
args=()
where=""  # the options that say where results go, repeated in the closing hint
while [ $# -gt 0 ]; do
  case "$1" in
    --matrix|-m) matrix="$2"; shift 2 ;;
    --results|--tracking-uri) args+=("$1" "$2"); where="$where $1 $2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
set +e
"$VENV/bin/harness" run --matrix "$matrix" ${args[@]+"${args[@]}"}
rc=$?
set -e
if [ "$rc" -le 1 ]; then
  echo "Compare the cells: $VENV/bin/harness report --matrix $matrix$where   or   $VENV/bin/harness ui --matrix $matrix$where" >&2
fi
exit "$rc"
