"""Greedy generations of transformers (and transformers + PEFT) on the tiny checkpoint.

For three prompts (text only, one image, two images; the model fixture's images) it writes the prompt ids and
the 32 greedily generated token ids, without and with the PEFT adapter of tests/fixtures/golden/peft/adapter.

Run after gen_peft.py: tools/golden/.venv/bin/python tools/golden/gen_generate.py
"""

import json
import os

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
IMGS = os.path.join(ROOT, "tests", "fixtures", "golden", "model")
ADAPTER = os.path.join(ROOT, "tests", "fixtures", "golden", "peft", "adapter")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "generate.json")

PROMPTS = [
    {"name": "text", "images": [], "messages": [{"role": "user", "content": "Say hello."}]},
    {"name": "one_image", "images": ["img_a.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "请识别并描述图片中的机器人及其特征"}]}]},
    {"name": "two_images", "images": ["img_b.png", "img_c.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]},
]


def main():
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(CKPT)
    base = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32),
                                      ADAPTER).eval()
    out = []
    for p in PROMPTS:
        text = processor.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        images = [Image.open(os.path.join(IMGS, f)).convert("RGB") for f in p["images"]] or None
        inputs = processor(text=[text], images=images, return_tensors="pt")
        row = {"name": p["name"], "messages": p["messages"], "images": p["images"], "prompt_ids": inputs["input_ids"][0].tolist()}
        # "base_rep" adds a repetition penalty: this random base otherwise repeats one token, which would not
        # exercise the decode path much.
        for key, model, rep in [("base", base, 1.0), ("base_rep", base, 1.3), ("adapter", tuned, 1.0)]:
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                     repetition_penalty=rep)
            row[key] = gen[0, inputs["input_ids"].shape[1]:].tolist()
        out.append(row)
        print(p["name"], row["base"][:8], row["base_rep"][:12], row["adapter"][:8])
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
