#!/usr/bin/env bash
# Install Synapse (pinned) into a venv for the e2e tests.
#   tests/e2e/setup.sh [VENV_DIR]      default: <repo>/target/e2e/venv
# Idempotent: does nothing if the venv already has this exact version.
# Prints the venv's python path on stdout (last line); progress goes to stderr.
set -euo pipefail

SYNAPSE_VERSION="${SYNAPSE_VERSION:-1.163.2}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/target/e2e/venv}"
PYTHON="${PYTHON:-python3}"

installed_version() {
    "$VENV_DIR/bin/python" - <<'PY' 2>/dev/null || true
import importlib.metadata as m
print(m.version("matrix-synapse"))
PY
}

if [ -x "$VENV_DIR/bin/python" ] && [ "$(installed_version)" = "$SYNAPSE_VERSION" ]; then
    echo "setup.sh: matrix-synapse $SYNAPSE_VERSION already in $VENV_DIR" >&2
else
    start=$(date +%s)
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        echo "setup.sh: creating venv $VENV_DIR" >&2
        mkdir -p "$(dirname "$VENV_DIR")"
        "$PYTHON" -m venv "$VENV_DIR"
    fi
    echo "setup.sh: installing matrix-synapse==$SYNAPSE_VERSION" >&2
    "$VENV_DIR/bin/python" -m pip install --disable-pip-version-check -q \
        "matrix-synapse==$SYNAPSE_VERSION" >&2
    got="$(installed_version)"
    if [ "$got" != "$SYNAPSE_VERSION" ]; then
        echo "setup.sh: expected matrix-synapse $SYNAPSE_VERSION, found '$got'" >&2
        exit 1
    fi
    echo "setup.sh: installed in $(( $(date +%s) - start )) s" >&2
fi
echo "$VENV_DIR/bin/python"
