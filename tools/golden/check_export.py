"""Checks `ferrotune export` against transformers + PEFT on the tiny checkpoint.

Exports base + the PEFT adapter of tests/fixtures/golden/peft/adapter with the built ferrotune binary (float32,
and auto = the stored bf16), loads each export with transformers, and compares its logits on a prompt with two
images: the float32 export against PeftModel(base, adapter) in float32; the bf16 export against PEFT's
merge_and_unload() rounded to bf16 the same way (A_log stays f32, as stored), and, for information, against the
unmerged float32 reference. Also checks that the processor and chat template load from the export.

Writes the check's measurements as JSON to --out (the Rust test `export_loads_in_transformers` runs this script
on the binary it was built with and asserts on them). With --write-reference it also writes transformers' own
numbers, which do not depend on ferrotune, to the committed fixture tests/fixtures/golden/export_reference.json:
how far the adapter moves the logits, and how far rounding PEFT's merged weights to bf16 moves them (the bound of
the bf16 export test); a test run leaves the fixture as committed.

Run: cargo build -p ferrotune && tools/golden/.venv/bin/python tools/golden/check_export.py [path/to/ferrotune]
     [--out FILE] [--write-reference]
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
IMGS = os.path.join(ROOT, "tests", "fixtures", "golden", "model")
ADAPTER = os.path.join(ROOT, "tests", "fixtures", "golden", "peft", "adapter")
REFERENCE = os.path.join(ROOT, "tests", "fixtures", "golden", "export_reference.json")
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe the robot."}]}]


def inputs(processor):
    text = processor.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    images = [Image.open(os.path.join(IMGS, f)).convert("RGB") for f in ["img_a.png", "img_b.png"]]
    return processor(text=[text], images=images, return_tensors="pt")


def main():
    import transformers
    import peft
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target", "debug", "ferrotune"))
    ap.add_argument("--out", help="where to write the check's JSON (default: print only)")
    ap.add_argument("--write-reference", action="store_true", help="regenerate tests/fixtures/golden/export_reference.json")
    args = ap.parse_args()
    binary = args.binary
    processor = AutoProcessor.from_pretrained(CKPT)
    batch = inputs(processor)
    base, base_info = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32, output_loading_info=True)
    tuned = PeftModel.from_pretrained(base, ADAPTER).eval()
    with torch.no_grad():
        want = tuned(**batch).logits.float()
        plain = tuned.get_base_model()
        with tuned.disable_adapter():
            base_logits = plain(**batch).logits.float()
    # PEFT's own merge, rounded to the stored dtype: what an auto (bf16) export must equal.
    merged = PeftModel.from_pretrained(
        Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32), ADAPTER).merge_and_unload().eval()
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if not name.endswith("A_log"):
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        want_bf16 = merged(**batch).logits.float()
    result = {"transformers": transformers.__version__, "peft": peft.__version__,
              "adapter_effect": float((want - base_logits).abs().max()),
              "bf16_rounding_effect": float((want_bf16 - want).abs().max())}
    if args.write_reference:
        with open(REFERENCE, "w") as f:
            json.dump({k: result[k] for k in ["transformers", "peft", "adapter_effect", "bf16_rounding_effect"]}, f,
                      indent=1)
            f.write("\n")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, reference, tol in [("float32", want, 1e-4), ("auto", want_bf16, 1e-3)]:
            out = os.path.join(tmp, dtype)
            subprocess.run([binary, "export", "--model_name_or_path", CKPT, "--adapter_name_or_path", ADAPTER,
                            "--export_dir", out, "--infer_dtype", dtype], check=True)
            model, info = Qwen3_5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                          output_loading_info=True)
            model.eval()
            exported_processor = AutoProcessor.from_pretrained(out)
            same_inputs = all(torch.equal(batch[k], inputs(exported_processor)[k]) for k in batch)
            with torch.no_grad():
                got = model(**batch).logits.float()
            diff = float((got - reference).abs().max())
            with open(os.path.join(out, "config.json")) as f:
                cfg_dtype = json.load(f).get("dtype")
            row = {
                "max_abs_logit_diff": diff,
                "tolerance": tol,
                "config_dtype": cfg_dtype,
                "missing_keys": sorted(info["missing_keys"]),
                "unexpected_keys": sorted(info["unexpected_keys"]),
                "base_unexpected_keys": sorted(base_info["unexpected_keys"]),
                "processor_inputs_equal": same_inputs,
                "chat_template_equal": exported_processor.chat_template == processor.chat_template,
                "files": sorted(os.listdir(out)),
            }
            row_ok = (diff <= tol and not row["missing_keys"] and row["unexpected_keys"] == row["base_unexpected_keys"]
                      and same_inputs and row["chat_template_equal"])
            ok = ok and row_ok
            result[dtype] = row
            print(dtype, "max |logit diff| =", diff, "ok" if row_ok else "FAILED")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    print(json.dumps(result, indent=1))
    print("export check", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
