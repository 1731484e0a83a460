#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and driver but no Rust: parity on CUDA against the committed
# fixtures, a LoRA training benchmark on a ~1B-parameter random-init qwen3_5, decode speed, one summary table.
# Each step has a time limit; together they stay under 8 minutes.
#
# Build and carry (see README, section GPU): tools/cuda/build.sh here, then run from the repository root there:
#   tools/cuda/check.sh [DIR]          DIR holds ferrotune(.xz) (+ ferrotune-it(.xz)); default target-cuda/gpu
# Environment: CHECK_OUT (logs and the generated checkpoint, default /tmp/ferrotune-gpu-check),
#   FERROTUNE_CUDA_LIBS (a folder with the CUDA 13 libraries, if the search below does not find them),
#   ANCHOR=0 (skip the PyTorch + PEFT runs beside ours), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-target-cuda/gpu}
OUT=${CHECK_OUT:-/tmp/ferrotune-gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/bin"
# build.sh carries the binaries xz-compressed: unpack them (xz, else Python's lzma).
for name in ferrotune ferrotune-it; do
  if [ -x "$DIR/$name" ]; then
    cp "$DIR/$name" "$OUT/bin/$name"
  elif [ -f "$DIR/$name.xz" ]; then
    xz -dc "$DIR/$name.xz" > "$OUT/bin/$name" 2>/dev/null \
      || "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$DIR/$name.xz" "$OUT/bin/$name"
    chmod +x "$OUT/bin/$name"
  fi
done
BIN=$OUT/bin/ferrotune
[ -x "$BIN" ] || { echo "check: no ferrotune in $DIR (build it with tools/cuda/build.sh and carry $DIR)" >&2; exit 2; }
T0=$(date +%s)

# 1. The CUDA 13 libraries the binary links (runtime, cuBLAS, cuRAND, NVRTC) from wherever this machine has them:
# PyTorch's nvidia-* wheels, a toolkit under /usr/local/cuda, the driver's folder. The driver's libcuda.so.1 must
# be the real one.
candidates() {
  [ -n "${FERROTUNE_CUDA_LIBS:-}" ] && echo "$FERROTUNE_CUDA_LIBS"
  "$PYTHON" - 2>/dev/null <<'PY'
import os
try:
    import nvidia
    for p in nvidia.__path__:
        for d in sorted(os.listdir(p)):
            if os.path.isdir(os.path.join(p, d, "lib")):
                print(os.path.join(p, d, "lib"))
except Exception:
    pass
PY
  ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib /usr/local/nvidia/lib64 \
    /usr/lib/x86_64-linux-gnu 2>/dev/null
}
LIBDIRS=""
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcuda.so.1; do
  for d in $(candidates); do
    if [ -e "$d/$so" ]; then
      case ":$LIBDIRS:" in *":$d:"*) ;; *) LIBDIRS="$LIBDIRS:$d" ;; esac
      break
    fi
  done
done
export LD_LIBRARY_PATH="${LIBDIRS#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$BIN" | grep -q "not found"; then
  echo "check: libraries not found (set FERROTUNE_CUDA_LIBS):" >&2
  ldd "$BIN" | grep "not found" >&2
  exit 2
fi
ldd "$BIN" | grep -E "libcuda|libcudart|libcublas|libcurand|libnvrtc" > "$OUT/ldd.txt"
echo "== libraries"; cat "$OUT/ldd.txt"

step() { # name, seconds, command...: runs with a limit, keeps the log, never stops the script
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  cat "$OUT/$name.log"
  echo "[$name: exit $rc, $(( $(date +%s) - s )) s]"
  echo "$rc" > "$OUT/$name.rc"
}

ANCHOR_ARGS=()
if [ "${ANCHOR:-1}" != 0 ] && "$PYTHON" -c "import torch, peft, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
  ANCHOR_ARGS=(--python "$(command -v "$PYTHON")")
fi

# 2. Environment and parity (logits f32/bf16 vs transformers, LoRA gradients vs PEFT, ops vs CPU, generation).
# Each step's limit is its worst case; together they stay under 8 minutes (typical runs take far less).
step env 20 "$BIN" env
step parity 100 "$BIN" gpu-check --device cuda
if [ -x "$OUT/bin/ferrotune-it" ]; then
  step cuda-tests 45 "$OUT/bin/ferrotune-it" cuda:: --test-threads 1
fi
# 3. A random-init ~1B qwen3_5 checkpoint (written once, then reused), checked by one short forward on the GPU.
step model 60 "$BIN" bench forward --preset 1b --cache "$OUT/models" --device cuda --seq 64 --steps 1
# 4. Training, in the reference run's sample shape: 2048 tokens with one 512x512 image (256 image tokens), batch
# 1; LoRA r=8 on every decoder linear, bf16 base, per-layer checkpointing.
step train 150 "$BIN" bench train --preset 1b --cache "$OUT/models" --device cuda --seq 2048 --image 512 \
  --steps 6 --rank 8 --json ${ANCHOR_ARGS[@]+"${ANCHOR_ARGS[@]}"}
# 5. Decoding: 256-token prompt, 128 greedy tokens, bf16 weights.
step decode 75 "$BIN" bench decode --preset 1b --cache "$OUT/models" --device cuda --seq 256 --new-tokens 128 \
  --json ${ANCHOR_ARGS[@]+"${ANCHOR_ARGS[@]}"}

# 6. One table.
echo
echo "== summary ($(( $(date +%s) - T0 )) s)"
"$PYTHON" - "$OUT" <<'PY' || { echo "(no python3: see the logs in $OUT)"; }
import json, os, re, sys
out = sys.argv[1]
read = lambda n: open(os.path.join(out, n)).read() if os.path.exists(os.path.join(out, n)) else ""
rc = lambda n: read(n + ".rc").strip() or "not run"
env = read("env.log")
gpu = re.search(r"gpu 0\s*:\s*(.*)", env)
drv = re.search(r"- cuda\s*:\s*(.*)", env)
rows = [("GPU", gpu.group(1) if gpu else "?"), ("driver", drv.group(1) if drv else "?")]
par = read("parity.log")
checks = [l for l in par.splitlines() if l.endswith(("PASS", "FAIL"))]
fails = [l.split("  ")[0] for l in checks if l.endswith("FAIL")]
rows.append(("parity", f"{len(checks) - len(fails)}/{len(checks)} checks pass (exit {rc('parity')})"
             + (f"; FAILED: {', '.join(fails)}" if fails else "")))
for key, label in [("logits float32", "logits f32 vs transformers, max abs"),
                   ("logits bfloat16", "logits bf16 vs transformers, max abs"),
                   ("LoRA all float32, checkpointed: worst", "LoRA grads f32 vs PEFT, worst rel"),
                   ("LoRA all bfloat16, checkpointed: all", "LoRA grads bf16 vs PEFT f32, rel")]:
    hits = [(float(l.split()[-4]), float(l.split()[-2])) for l in checks if l.startswith(key)]
    if hits:  # the case closest to its bound
        m, b = max(hits, key=lambda h: h[0] / h[1] if h[1] else float("inf"))
        rows.append(("  " + label, f"{m:.2e} (bound {b:.1e})"))
if os.path.exists(os.path.join(out, "cuda-tests.rc")):
    t = re.search(r"test result: .*", read("cuda-tests.log"))
    rows.append(("cuda tests", t.group(0) if t else f"exit {rc('cuda-tests')}"))
def bench(name):
    lines = [l for l in read(name + ".log").splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "?"
t = bench("train")
if t:
    f = t["ferrotune"]
    rows.append(("train 1B (LoRA, bf16)", f"{f['samples_per_second']:.3f} samples/s, {f['tokens_per_second']:.0f} tokens/s, "
                 f"peak GPU {gib(f['peak_gpu'])}  [{f['params'] / 1e9:.2f}B params, 2048 tokens + 512² image]"))
    if "python" in t:
        p = t["python"]
        rows.append(("  pytorch+peft", f"{p['samples_per_second']:.3f} samples/s, {p['tokens_per_second']:.0f} tokens/s, "
                     f"peak GPU {gib(p.get('peak_gpu'))}  (ferrotune/pytorch time {f['wall_per_sample'] / p['wall_per_sample']:.2f}x)"))
else:
    rows.append(("train 1B", f"no result (exit {rc('train')})"))
d = bench("decode")
if d:
    f = d["ferrotune"]
    rows.append(("decode 1B (bf16)", f"{f['tokens_per_second']:.1f} tokens/s, first token {f['ttft']:.3f} s, peak GPU {gib(f['peak_gpu'])}"))
    if "python" in d:
        p = d["python"]
        rows.append(("  transformers", f"{p['tokens_per_second']:.1f} tokens/s, first token {p['ttft']:.3f} s"))
else:
    rows.append(("decode 1B", f"no result (exit {rc('decode')})"))
w = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"| {k:<{w}} | {v}")
PY
for s in parity model train decode; do [ "$(cat "$OUT/$s.rc" 2>/dev/null)" = 0 ] || exit 1; done
