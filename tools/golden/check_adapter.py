"""Checks that PEFT loads an adapter written by `ferrotune train` onto the tiny checkpoint without warnings,
and records its logits on the one-image model input, for the Rust test that compares them with ferrotune's.

The adapter in tests/fixtures/golden/ferrotune_adapter/ was made with `ferrotune train` (LoRA r=4 on
`lora_target: all`, 8 robot rows, 2 epochs, lr 5e-3) and copied there (adapter_config.json and
adapter_model.safetensors only).

Run: tools/golden/.venv/bin/python tools/golden/check_adapter.py
"""

import json
import os
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
        model = PeftModel.from_pretrained(base, ADAPTER).eval()
    messages = records + [str(w.message) for w in caught]
    t = load_file(CASE)
    pv = t["pixel_levels"].float() * (1.0 / 255.0)
    pv = (pv - 0.5) / 0.5
    ids = t["input_ids"][None]
    mm = (ids == model.config.image_token_id).to(torch.int32)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pv, image_grid_thw=t["image_grid_thw"], mm_token_type_ids=mm).logits
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    n_file = len(load_file(os.path.join(ADAPTER, "adapter_model.safetensors")))
    ok = not messages and n_lora == n_file
    out = {"ok": ok, "warnings": messages, "lora_tensors_loaded": n_lora, "tensors_in_file": n_file}
    with open(os.path.join(ROOT, "tests", "fixtures", "golden", "ferrotune_adapter_check.json"), "w") as f:
        json.dump(out, f, indent=1)
    save_file({"logits_tail": logits[0, -12:].contiguous()}, os.path.join(ROOT, "tests", "fixtures", "golden", "ferrotune_adapter_logits.safetensors"))
    print(out)


if __name__ == "__main__":
    main()
