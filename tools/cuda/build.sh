#!/usr/bin/env bash
# Builds ferrotune with CUDA (the toolchain from setup.sh) and puts stripped, xz-compressed copies of the binary
# and of the integration-test binary in target-cuda/gpu/, the folder to carry to a GPU machine (which needs no
# Rust there; tools/cuda/check.sh unpacks them). Stripped, the binary is ~60 MB, most of it GPU code that
# candle-kernels links in (its GGUF/MoE kernels): too much beside the repository for a 64 MiB carry; xz brings
# it to ~8 MB. Uncompressed stripped copies stay in target-cuda/stripped/ for use on this machine.
# Usage: tools/cuda/build.sh [--no-tests]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f tools/cuda/.venv/env.sh ] || tools/cuda/setup.sh >/dev/null
# shellcheck disable=SC1091
source tools/cuda/.venv/env.sh
PY=tools/cuda/.venv/bin/python
OUT=$CARGO_TARGET_DIR/gpu
BIN=$CARGO_TARGET_DIR/stripped
mkdir -p "$OUT" "$BIN"

start=$(date +%s)
cargo build --release --locked --features cuda -p ferrotune
strip -o "$BIN/ferrotune" "$CARGO_TARGET_DIR/release/ferrotune"
rm -f "$OUT"/*
if [ "${1:-}" != "--no-tests" ]; then
  # The integration-test binary (its `cuda::` tests need a GPU and skip without one).
  it=$(cargo test --release --locked --features cuda -p ferrotune-core --test it --no-run --message-format=json \
    | "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "it":
        print(m["executable"])')
  strip -o "$BIN/ferrotune-it" "$it"
fi
echo "built in $(( $(date +%s) - start )) s"
for f in "$BIN"/*; do xz -9 -T2 -c "$f" > "$OUT/$(basename "$f").xz"; done
echo "carry $OUT (and the repository, which holds the fixtures):"
ls -l "$BIN" "$OUT"
