#!/usr/bin/env bash
# Regenerate the Python stubs of treadle.v1 next to the .proto (needs grpcio-tools,
# pinned in the dev extra so the output is reproducible; CI checks for drift).
#   proto/generate.sh            write the stubs into proto/treadle/v1/
#   proto/generate.sh OUT_DIR    write them under OUT_DIR/treadle/v1/ instead
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
mkdir -p "$out/treadle/v1"
python="${PYTHON:-python3}"
"$python" -m grpc_tools.protoc -I "$here" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$here/treadle/v1/treadle.proto"
