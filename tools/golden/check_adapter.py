"""Checks that PEFT loads an adapter written by `ferrotune train` onto the tiny checkpoint without warnings,
and records PEFT's logits with it on the one-image model input, for the Rust tests that compare them with
ferrotune's.

--adapter DIR --out DIR: the adapter to check (the Rust test `peft_loads_a_fresh_adapter` passes one that the
current `ferrotune train` just wrote) and where to write check.json (PEFT's warnings, LoRA tensors loaded and in
the file) and logits.safetensors. Without them: the committed adapter in tests/fixtures/golden/ferrotune_adapter/
(`ferrotune train`, LoRA r=4 on `lora_target: all`, 8 robot rows, 2 epochs, lr 5e-3) and its committed logits
tests/fixtures/golden/ferrotune_adapter_logits.safetensors. Exits non-zero on a warning or a tensor not loaded.

Run: tools/golden/.venv/bin/python tools/golden/check_adapter.py [--adapter DIR --out DIR]
"""

import argparse
import json
import os
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
ADAPTER = os.path.join(ROOT, "tests", "fixtures", "golden", "ferrotune_adapter")
CASE = os.path.join(ROOT, "tests", "fixtures", "golden", "model", "one_image.safetensors")


def main():
    import logging

    from peft import PeftModel
    from transformers import Qwen3_5ForConditionalGeneration

    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=ADAPTER)
    ap.add_argument("--out")
    args = ap.parse_args()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    for name in ("peft", "transformers"):
        logging.getLogger(name).addHandler(Keep())
    base = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32)
    records.clear()  # only what loading the adapter says counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, args.adapter).eval()
    messages = records + [str(w.message) for w in caught]
    t = load_file(CASE)
    pv = t["pixel_levels"].float() * (1.0 / 255.0)
    pv = (pv - 0.5) / 0.5
    ids = t["input_ids"][None]
    mm = (ids == model.config.image_token_id).to(torch.int32)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pv, image_grid_thw=t["image_grid_thw"], mm_token_type_ids=mm).logits
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    n_file = len(load_file(os.path.join(args.adapter, "adapter_model.safetensors")))
    report = {"warnings": messages, "lora_tensors_loaded": n_lora, "tensors_in_file": n_file}
    tail = {"logits_tail": logits[0, -12:].contiguous()}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check.json"), "w") as f:
            json.dump(report, f, indent=1)
        save_file(tail, os.path.join(args.out, "logits.safetensors"))
    else:
        save_file(tail, os.path.join(ROOT, "tests", "fixtures", "golden", "ferrotune_adapter_logits.safetensors"))
    print(json.dumps(report))
    sys.exit(0 if not messages and n_lora == n_file else 1)


if __name__ == "__main__":
    main()
