#!/usr/bin/env bash
# Install into .venv if needed, then run `treadle serve` with the given flags.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
"$root/deploy/local/install.sh"
exec "${TREADLE_VENV:-$root/.venv}/bin/treadle" serve "$@"
