#!/usr/bin/env bash
# The test command: install into .venv if needed, lint, type-check, run every test.
# Extra arguments go to pytest (e.g. tests/run.sh tests/unit -x).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
"$root/deploy/local/install.sh" --dev
bin="${TREADLE_VENV:-$root/.venv}/bin"

echo "[tests] ruff" >&2
"$bin/ruff" check .
"$bin/ruff" format --check .

echo "[tests] mypy" >&2
"$bin/mypy" -p treadle.server -p treadle.scheduler -p treadle.worker -p treadle.client -p treadle.api
"$bin/mypy" "$root/bench"

echo "[tests] pytest" >&2
"$bin/pytest" "$@"
