#!/usr/bin/env bash
# Creates .venv with the project installed (editable, CPU backend, test extras) and
# Debian's OpenBLAS, which mlx's CPU wheels run about 60x faster with than with their
# bundled reference BLAS. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
extras="test"
[ "$(uname -s)" = "Linux" ] && extras="cpu,test"
[ -n "${MLX_TQ_EXTRAS:-}" ] && extras="$MLX_TQ_EXTRAS"
.venv/bin/python -m pip install -q -e ".[$extras]"
