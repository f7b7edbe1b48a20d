#!/usr/bin/env bash
# Install, then run the test suite (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
source scripts/env.sh
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
