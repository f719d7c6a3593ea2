#!/usr/bin/env bash
# The main job: set up, then fine-tune the embedded tiny generator with DanceGRPO on this CPU.
# Extra arguments go to `dancegrpo train`, e.g. --set trainer.iterations=10.
# Run again: --resume continues runs/quickstart (e.g. after Ctrl-C), --overwrite starts it over
# (deleting the previous run), --output-dir runs/<name> starts a second run beside it; with none of
# these, a second run stops with a message instead of overwriting the first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/dancegrpo train --config configs/quickstart.yaml "$@"
