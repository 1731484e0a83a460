"""Checks `ferrotune export --export_format gguf` against llama.cpp (llama-cpp-python 0.3.36, its vendored llama.cpp
at commit 0c1e5709) on the tiny checkpoint with the PEFT adapter of tests/fixtures/golden/peft/adapter.

1. llama.cpp's own converter (convert_hf_to_gguf.py of the same llama.cpp, run with tools/golden/.venv's torch on
   the adapter merged into the base by `ferrotune export --infer_dtype float32`) writes the bf16 model and projector;
   their tensor names, shapes, types, data hashes (FNV-1a 64) and metadata are recorded. The converter does not
   know the tiny tokenizer's pre-tokenizer hash; it is told `qwen35`, as for Qwen3.5's own.
2. ferrotune's GGUF files (f32, bf16, f16, q8_0, q4_k_m) and its GGUF LoRA are run in llama.cpp on fixed token-id
   prompts: the last position's logits and 12 greedy tokens, for the merged model and for the bf16 base with the
   LoRA applied at run time; and the f32 and bf16 model + projector on a chat prompt with a picture through
   llama.cpp's multimodal library (mtmd): the text tokens it made and the last logits.
3. ggml's reference quantizer (`ggml_quantize_chunk` of the installed libggml) quantizes fixed random rows to
   Q8_0, Q5_0, Q4_K and Q6_K.
4. llama-quantize (`llama_model_quantize`) turns the converter's bf16 file into Q4_K_M: the type it picks per tensor.

Writes tests/fixtures/golden/gguf/{reference.json, logits.safetensors, quant.safetensors, image.png}, which the Rust test
`gguf_export_equals_llama_cpp` checks ferrotune against; with --out FILE only (no --write-reference) it writes the
same measurements elsewhere and leaves the fixture as committed.

Run: bash tools/golden/setup_gguf.sh (once), cargo build --release, then
     tools/golden/.venv-gguf/bin/python tools/golden/check_gguf.py [path/to/ferrotune] [--write-reference]
"""

import ctypes
import json
import os
import subprocess
import sys
import tempfile

import gguf
import numpy as np
from safetensors.numpy import save_file

import llama_cpp
from llama_cpp import llama_cpp as L

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
ADAPTER = os.path.join(ROOT, "tests", "fixtures", "golden", "peft", "adapter")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "gguf")
GOLDEN_PY = os.path.join(HERE, ".venv", "bin", "python")
LLAMA_SRC = os.path.join(HERE, ".venv-gguf", "src", "llama.cpp")
PROMPTS = [[10, 20, 30, 40, 50], [1500, 7, 300, 812, 99, 4, 1200, 640], [2001, 300, 301, 302, 1999, 5, 6, 7, 8, 9, 10, 11]]
QUANTS = ["f32", "bf16", "f16", "q8_0", "q4_k_m"]
GREEDY = 12
QUIET = L.llama_log_callback(lambda level, text, data: None)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def listing(path, with_hash):
    r = gguf.GGUFReader(path)
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        types = [t.name for t in f.types]
        v = f.contents()
        if isinstance(v, list) and len(v) > 16:
            v = {"len": len(v), "fnv1a64": fnv1a64("\n".join(map(str, v)).encode())}
        kv[k] = [types, v]
    tensors = [
        {
            "name": t.name,
            "ne": [int(d) for d in t.shape],
            "type": t.tensor_type.name,
            **({"fnv1a64": fnv1a64(bytes(t.data.tobytes()))} if with_hash else {}),
        }
        for t in r.tensors
    ]
    return {"kv": kv, "tensors": tensors}


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def quantize(src, dst):
    """llama-quantize to Q4_K_M."""
    qp = L.llama_model_quantize_default_params()
    qp.ftype = 15
    qp.nthread = 2
    if L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(qp)) != 0:
        sys.exit("llama_model_quantize failed")


def convert(merged, outfile, extra):
    """llama.cpp's converter, with the tiny tokenizer's pre-tokenizer named (the last --outtype wins)."""
    shim = (
        "import sys, runpy\n"
        "src = sys.argv[1]\n"
        "sys.path[:0] = [src + '/gguf-py', src]\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen35'\n"
        "sys.argv = [src + '/convert_hf_to_gguf.py'] + sys.argv[2:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    run([GOLDEN_PY, "-c", shim, LLAMA_SRC, merged, "--outtype", "bf16", "--outfile", outfile] + extra)


class Model:
    def __init__(self, path, lora=None):
        mp = L.llama_model_default_params()
        self.m = L.llama_model_load_from_file(path.encode(), mp)
        if not self.m:
            sys.exit(f"llama.cpp could not load {path}")
        self.lora = L.llama_adapter_lora_init(self.m, lora.encode()) if lora else None
        if lora and not self.lora:
            sys.exit(f"llama.cpp could not load the LoRA {lora}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.m))

    def context(self):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 128, 64, 64, 2, 2
        ctx = L.llama_init_from_model(self.m, cp)
        if self.lora:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.lora)
            scales = (ctypes.c_float * 1)(1.0)
            if L.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
                sys.exit("llama.cpp did not apply the LoRA")
        return ctx

    def decode(self, ctx, ids, start):
        b = L.llama_batch_init(len(ids), 0, 1)
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i == len(ids) - 1 else 0
        b.n_tokens = len(ids)
        if L.llama_decode(ctx, b) != 0:
            sys.exit("llama_decode failed")
        out = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, len(ids) - 1), (self.n_vocab,)).copy()
        L.llama_batch_free(b)
        return out

    def run(self, prompt):
        """The prompt's last logits and the greedy continuation."""
        ctx = self.context()
        logits = self.decode(ctx, prompt, 0)
        first, toks, cur = logits, [], logits
        for i in range(GREEDY):
            t = int(np.argmax(cur))
            toks.append(t)
            cur = self.decode(ctx, [t], len(prompt) + i)
        L.llama_free(ctx)
        return first, toks


IMAGE_SIDE = 128
IMAGE_TEXT = "Describe the robot."


def image_rgb():
    """A 128×128 test picture (16 image tokens after the 2×2 merge; a multiple of 32 pixels, so neither side
    resizes it)."""
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE]
    return np.stack([(x * 2) % 256, (y * 2) % 256, ((x ^ y) * 3) % 256], -1).astype(np.uint8)


def write_png(path, img):
    import struct
    import zlib

    h, w, _ = img.shape
    rows = b"".join(b"\x00" + img[i].tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def image_prompt(model_path, mmproj_path):
    """The chat-rendered prompt with the picture through llama.cpp's multimodal path (mtmd): the text tokens it
    made of the prompt and the last position's logits."""
    from llama_cpp import mtmd_cpp as M

    m = Model(model_path)
    mp = M.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.print_timings = False, 2, False
    mc = M.mtmd_init_from_file(mmproj_path.encode(), m.m, mp)
    if not mc:
        sys.exit(f"llama.cpp could not load the projector {mmproj_path}")
    ctx = m.context()
    img = image_rgb()
    bitmap = M.mtmd_bitmap_init(IMAGE_SIDE, IMAGE_SIDE, (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
    text = (f"<|im_start|>user\n{M.mtmd_default_marker().decode()}{IMAGE_TEXT}<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n").encode()
    it = M.mtmd_input_text()
    it.text, it.text_len, it.add_special, it.parse_special = text, len(text), False, True
    chunks = M.mtmd_input_chunks_init()
    if M.mtmd_tokenize(mc, chunks, ctypes.byref(it), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
        sys.exit("mtmd_tokenize failed")
    parts = []
    for i in range(M.mtmd_input_chunks_size(chunks)):
        c = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(c) == 0:
            n = ctypes.c_size_t()
            p = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
            parts.append([int(p[j]) for j in range(n.value)])
        else:
            parts.append({"image_tokens": int(M.mtmd_input_chunk_get_n_tokens(c))})
    n_past = L.llama_pos(0)
    if M.mtmd_helper_eval_chunks(mc, ctx, chunks, 0, 0, 64, True, ctypes.byref(n_past)) != 0:
        sys.exit("mtmd_helper_eval_chunks failed")
    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), (m.n_vocab,)).copy()
    M.mtmd_free(mc)
    return parts, logits


def ggml_quant_reference():
    """Fixed random rows through ggml's own quantizer."""
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ggml = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    rng = np.random.default_rng(20261207)
    rows, n = 16, 512
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    x[3, 17] = 9.0  # an outlier
    x[5, :64] = 0.0  # empty sub-blocks
    out = {"input": x}
    for name, ty, blk, size in [("Q8_0", 8, 32, 34), ("Q5_0", 6, 32, 22), ("Q4_K", 12, 256, 144), ("Q6_K", 14, 256, 210)]:
        dst = np.zeros(rows * n // blk * size, np.uint8)
        ggml.ggml_quantize_chunk(ty, x.ctypes.data, dst.ctypes.data, 0, rows, n, None)
        out[name] = dst
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    binary = args[0] if args else os.path.join(ROOT, "target", "release", "ferrotune")
    write_ref = "--write-reference" in sys.argv
    out_file = next((sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--out"), None)
    L.llama_backend_init()
    L.llama_log_set(QUIET, None)
    with tempfile.TemporaryDirectory() as tmp:
        merged = os.path.join(tmp, "merged")
        run([binary, "export", "--model_name_or_path", CKPT, "--adapter_name_or_path", ADAPTER, "--export_dir", merged,
             "--infer_dtype", "float32"])
        ref = {"llama_cpp": "llama-cpp-python 0.3.36 (llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f)",
               "gguf": "0.19.0", "prompts": PROMPTS}
        if os.path.isdir(LLAMA_SRC) and os.path.exists(GOLDEN_PY):
            conv = os.path.join(tmp, "conv.gguf")
            convert(merged, conv, ["--no-mtp"])
            convert(merged, os.path.join(tmp, "conv-mmproj.gguf"), ["--mmproj"])
            ref["converter"] = {"model": listing(conv, True), "mmproj": listing(os.path.join(tmp, "conv-mmproj.gguf"), True)}
            q = os.path.join(tmp, "conv-q4km.gguf")
            quantize(conv, q)
            ref["llama_quantize_q4_k_m"] = [{"name": t["name"], "type": t["type"]} for t in listing(q, False)["tensors"]]
            # The base alone (stored in bf16, so both sides quantize the same values): the converter's Q8_0 and
            # llama-quantize's Q4_K_M of its bf16 file, data hashes included.
            base_bf16, base_q8, base_q4 = (os.path.join(tmp, f"base-{n}.gguf") for n in ("bf16", "q8", "q4"))
            convert(CKPT, base_bf16, ["--no-mtp"])
            convert(CKPT, base_q8, ["--no-mtp", "--outtype", "q8_0"])
            quantize(base_bf16, base_q4)
            ref["converter"]["base_q8_0"] = listing(base_q8, True)
            ref["llama_quantize_base_q4_k_m"] = listing(base_q4, True)
        else:
            print(f"note: {LLAMA_SRC} or {GOLDEN_PY} missing: the converter's listing is not regenerated", file=sys.stderr)
        logits, greedy = {}, {}
        for quant in QUANTS:
            d = os.path.join(tmp, quant)
            run([binary, "export", "--model_name_or_path", CKPT, "--adapter_name_or_path", ADAPTER, "--export_dir", d,
                 "--export_format", "gguf", "--export_quant", quant])
            path = next(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".gguf") and not f.startswith("mmproj"))
            m = Model(path)
            runs = [m.run(p) for p in PROMPTS]
            for i, (lg, toks) in enumerate(runs):
                logits[f"{quant}.{i}"] = lg.astype(np.float32)
            greedy[quant] = [toks for _, toks in runs]
            if quant in ("f32", "bf16"):
                mmproj = next(os.path.join(d, f) for f in os.listdir(d) if f.startswith("mmproj"))
                parts, lg = image_prompt(path, mmproj)
                ref[f"image_prompt_{quant}"] = parts
                logits[f"{quant}.image"] = lg.astype(np.float32)
        # The base alone in bf16 with the GGUF LoRA applied at run time.
        base = os.path.join(tmp, "base")
        run([binary, "export", "--model_name_or_path", CKPT, "--export_dir", base, "--export_format", "gguf"])
        lora = os.path.join(tmp, "lora")
        run([binary, "export", "--model_name_or_path", CKPT, "--adapter_name_or_path", ADAPTER, "--export_dir", lora,
             "--export_format", "gguf-lora"])
        m = Model(os.path.join(base, "base-BF16.gguf"), os.path.join(lora, "lora-lora-F32.gguf"))
        runs = [m.run(p) for p in PROMPTS]
        for i, (lg, _) in enumerate(runs):
            logits[f"bf16+lora.{i}"] = lg.astype(np.float32)
        greedy["bf16+lora"] = [toks for _, toks in runs]
        ref["greedy"] = greedy
        quant_ref = ggml_quant_reference()
    ref["image"] = {"file": "image.png", "text": IMAGE_TEXT}
    if write_ref:
        os.makedirs(OUT, exist_ok=True)
        write_png(os.path.join(OUT, "image.png"), image_rgb())
        with open(os.path.join(OUT, "reference.json"), "w") as f:
            json.dump(ref, f, indent=1)
            f.write("\n")
        save_file(logits, os.path.join(OUT, "logits.safetensors"))
        save_file(quant_ref, os.path.join(OUT, "quant.safetensors"))
        print(f"wrote {OUT}")
    if out_file:
        with open(out_file, "w") as f:
            json.dump(ref, f)
        save_file(logits, out_file + ".logits.safetensors")
        save_file(quant_ref, out_file + ".quant.safetensors")
    for k, v in greedy.items():
        print(k, v[0])


if __name__ == "__main__":
    main()
