#!/usr/bin/env bash
# Builds ferrotune with CUDA (the toolchain from setup.sh) and puts stripped copies of the binary and of the
# CUDA test binary in target-cuda/gpu/, the folder to carry to a GPU machine (which needs no Rust there).
# Usage: tools/cuda/build.sh [--no-tests]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f tools/cuda/.venv/env.sh ] || tools/cuda/setup.sh >/dev/null
# shellcheck disable=SC1091
source tools/cuda/.venv/env.sh
PY=tools/cuda/.venv/bin/python
OUT=$CARGO_TARGET_DIR/gpu
mkdir -p "$OUT"

start=$(date +%s)
cargo build --release --locked --features cuda -p ferrotune
strip -o "$OUT/ferrotune" "$CARGO_TARGET_DIR/release/ferrotune"
if [ "${1:-}" != "--no-tests" ]; then
  # The integration-test binary (its `cuda::` tests need a GPU and skip without one).
  it=$(cargo test --release --locked --features cuda -p ferrotune-core --test it --no-run --message-format=json \
    | "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "it":
        print(m["executable"])')
  strip -o "$OUT/ferrotune-it" "$it"
fi
echo "built in $(( $(date +%s) - start )) s; carry $OUT (and the repository, which holds the fixtures):"
ls -l "$OUT"
du -sh "$OUT"
