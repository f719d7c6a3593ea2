#!/usr/bin/env bash
# On a machine with a package registry: download into .whl/ (ignored by git) the wheels that a
# GPU machine without internet lacks, for its Python and platform, at the versions pinned in
# constraints.txt. Bring .whl/ along with the checkout and install them there (docs/gpu.md).
#
#   bash scripts/fetch_wheels.sh                      # diffusers, nvtx, importlib_metadata
#   bash scripts/fetch_wheels.sh peft accelerate      # ... and these too
#   PYTHON_VERSION=3.11 bash scripts/fetch_wheels.sh  # the GPU machine's Python (default 3.12)
#
# The default set is what a torch-only GPU image (torch, triton, transformers, peft, accelerate,
# safetensors, pytest) lacked on the first H200 run. Versions not pinned in constraints.txt
# are refused: pin them there first, so both machines run the same code.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
packages=(diffusers nvtx importlib_metadata "$@")
pinned=()
for name in "${packages[@]}"; do
  version="$(grep -i "^${name}==" constraints.txt | head -n 1 | cut -d= -f3 || true)"
  if [ -z "$version" ]; then
    echo "fetch_wheels: ${name} has no pin in constraints.txt; add 'name==version' there first" >&2
    exit 2
  fi
  pinned+=("${name}==${version}")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --dest .whl "${pinned[@]}"
ls -la .whl
