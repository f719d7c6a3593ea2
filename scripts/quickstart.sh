#!/usr/bin/env bash
# The main job: set up, then fine-tune the embedded tiny generator with DanceGRPO on this CPU.
# Extra arguments go to `dancegrpo train`, e.g. --set trainer.iterations=10
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/dancegrpo train --config configs/quickstart.yaml "$@"
