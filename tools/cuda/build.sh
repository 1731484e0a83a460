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
# One cargo invocation for the binary and the test binary: two would resolve features differently (the test
# activates dev-dependencies) and compile every CUDA kernel twice.
targets=(--bins)
[ "${1:-}" = "--no-tests" ] || targets+=(--test it)
cargo build --release --locked --features cuda "${targets[@]}" --message-format=json-render-diagnostics \
  > "$CARGO_TARGET_DIR/build-artifacts.json"
exe() { # target name, test?: the executable cargo reported
  "$PY" -c 'import json, sys
for l in open(sys.argv[1]):
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[2] \
            and m["profile"]["test"] == (sys.argv[3] == "1"):
        print(m["executable"])' "$CARGO_TARGET_DIR/build-artifacts.json" "$1" "$2" | tail -1
}
rm -f "$OUT"/* "$BIN"/*
strip -o "$BIN/ferrotune" "$(exe ferrotune 0)"
[ "${1:-}" = "--no-tests" ] || strip -o "$BIN/ferrotune-it" "$(exe it 1)"
echo "built in $(( $(date +%s) - start )) s"
for f in "$BIN"/*; do xz -9 -T2 -c "$f" > "$OUT/$(basename "$f").xz"; done
echo "carry $OUT (and the repository, which holds the fixtures):"
ls -l "$BIN" "$OUT"
