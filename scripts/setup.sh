#!/usr/bin/env bash
# Idempotent set-up: a Python 3.11 virtual environment in .venv/ at the repo root
# with the pinned dependencies and rest_ds installed in editable mode.
# A second run with nothing changed takes well under a second: pip is skipped
# while the stamp (a hash of the packaging files) matches and the console
# script exists.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.rest_ds_setup_stamp"
# torch and torchvision first, alone: pip takes the pinned wheels from the
# machine's local wheel store; resolving them together with everything else
# could pick other (e.g. CUDA-index) builds.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

find_python() {
    local cand
    for cand in "${PYTHON:-}" python3.11 python3 python; do
        [ -n "$cand" ] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

want_hash() {
    cat setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1
}

if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "setup.sh: $VENV is not a Python 3.11 environment; remove it and rerun" >&2
    exit 1
fi

if [ -x "$VENV/bin/rest-ds" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_hash)" ]; then
    echo "setup.sh: .venv is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    PY="$(find_python)" || { echo "setup.sh: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    echo "setup.sh: creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
echo "setup.sh: installing ${TORCH_PINS[*]}"
"${PIP[@]}" "${TORCH_PINS[@]}"
echo "setup.sh: installing rest_ds (editable) with its pinned dependencies"
"${PIP[@]}" -e ".[test]"

"$VENV/bin/rest-ds" --version >/dev/null
want_hash > "$STAMP"
echo "setup.sh: done"
