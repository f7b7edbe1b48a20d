#!/usr/bin/env bash
# Install, then generate through a TurboQuant-compressed cache with the shipped demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
source scripts/env.sh
.venv/bin/python -m mlx_lm_turboquant.demo "$@"
