#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml (run after changing a dependency, commit the result):
#   bash requirements/refresh.sh
# server.lock.txt: what `treadle[server]` runs with (images, deploy/local/install.sh);
# dev.lock.txt: the same plus the test and lint tools (tests/run.sh, CI).
# Both are universal (markers, hashes for every platform's wheel) and leave torch out: the
# CPU or CUDA build is installed on its own first. Resolution assumes the CPU build of
# torch==2.13.0, found in TORCH_FIND_LINKS (a folder or page with that wheel; default
# /opt/wheels, else PyTorch's CPU index).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
uv_version="0.13.9"
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check "uv==$uv_version"
echo "torch==2.13.0+cpu" >"$tools/torch.txt"
find_links="${TORCH_FIND_LINKS:-/opt/wheels}"
[[ -e "$find_links" ]] || find_links="https://download.pytorch.org/whl/cpu/torch/"
for extras in server dev; do
  args=(--extra server)
  [[ "$extras" == dev ]] && args+=(--extra dev)
  echo "[lock] requirements/$extras.lock.txt" >&2
  (cd "$root" && "$tools/venv/bin/uv" pip compile pyproject.toml "${args[@]}" \
    --universal --fork-strategy fewest --python-version 3.11 --generate-hashes \
    --find-links "$find_links" -c "$tools/torch.txt" --no-emit-package torch \
    --custom-compile-command "bash requirements/refresh.sh" \
    -q -o "requirements/$extras.lock.txt")
done
