#!/usr/bin/env bash
# Create .venv (once) and install dancegrpo with the pinned versions of constraints.txt.
# Sourced by quickstart.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
extras="${1:-}"
stamp=".venv/.dancegrpo-installed${extras:+-$extras}"
# Reinstall when the package description, the pins or the extension sources changed.
changed_sources="$(find csrc -type f -newer "$stamp" 2>/dev/null | head -n 1 || true)"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] || [ -n "$changed_sources" ]; then
  pip_install=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
  # The C++ extension of dancegrpo.ops compiles against torch, so torch comes first and the
  # package is built without pip's build isolation (which would hide torch from setup.py).
  echo "[setup] installing torch and the build tools (pinned versions, constraints.txt)"
  "${pip_install[@]}" torch setuptools wheel
  echo "[setup] installing dancegrpo${extras:+[$extras]} (pinned versions)"
  DANCEGRPO_BUILD_EXT=0 "${pip_install[@]}" --no-build-isolation -e ".${extras:+[$extras]}"
  # An editable install does not reliably build extensions, so build them in place explicitly.
  # They are optional (dancegrpo.ops falls back to torch), so a failed build only warns.
  echo "[setup] building the C++ extension of dancegrpo.ops (about a minute; log: .venv/build_ext.log)"
  if ! .venv/bin/python setup.py build_ext --inplace > .venv/build_ext.log 2>&1; then
    echo "[setup] WARNING: the C++ extension did not build (see .venv/build_ext.log); dancegrpo.ops uses torch"
  fi
  touch "$stamp"
fi
