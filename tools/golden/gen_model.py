"""Reference outputs of transformers' Qwen3.5 on the tiny checkpoint, for the Rust model parity tests.

For three inputs (text only, one image, two images of different sizes) it writes, per case:
  input_ids, image_grid_thw, pixel_values (as the exact uint8 levels k, value = k/127.5 - 1),
  position_ids (3-D M-RoPE) and rope_delta, the image embeddings after the merger, the hidden state after
  every decoder layer (all positions), the final-normed hidden state, and the logits of the last TAIL
  positions (f32 model), plus the same logits from the model loaded in bf16.

Run: tools/golden/.venv/bin/python tools/golden/gen_model.py
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "model")
TAIL = 12


def make_image(w, h, seed):
    """A smooth synthetic picture (gradients and a disc) that compresses well as PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, size=(3, 3))
    img = np.stack([255 * (c[i, 0] * x / w + c[i, 1] * y / h + c[i, 2]) / (1 + c[i].sum()) for i in range(3)], -1)
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, 0.25 * min(w, h)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    img[disc] = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


CASES = [
    {
        "name": "text",
        "images": [],
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is shown in this image? Answer in one sentence."},
            {"role": "assistant", "content": "The picture shows a red circle at the top left."},
            {"role": "user", "content": "请描述这张图片。"},
        ],
    },
    {
        "name": "one_image",
        "images": [("img_a.png", 100, 70, 1)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "请识别并描述图片中的机器人及其特征"}]},
        ],
    },
    {
        "name": "two_images",
        "images": [("img_b.png", 64, 160, 2), ("img_c.png", 130, 96, 3)],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                         {"type": "text", "text": "and"}, {"type": "image"}]},
        ],
    },
]


def main():
    from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(CKPT)
    model = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32).eval()
    model_bf16 = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.bfloat16).eval()
    index = []
    for case in CASES:
        images = []
        for fname, w, h, seed in case["images"]:
            img = make_image(w, h, seed)
            img.save(os.path.join(OUT, fname), optimize=True)
            images.append(Image.open(os.path.join(OUT, fname)).convert("RGB"))
        text = processor.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        ids = inputs["input_ids"]
        tensors = {"input_ids": ids[0].to(torch.int64)}
        kwargs = {}
        if images:
            pv = inputs["pixel_values"]
            k = torch.round((pv + 1.0) * 127.5)
            # Stored as the uint8 levels (4x smaller); the f32 values differ from k/127.5-1 only by rounding.
            assert (k / 127.5 - 1.0 - pv).abs().max() <= 1e-6, "pixel values are not uint8 levels"
            tensors["pixel_levels"] = k.to(torch.uint8)
            tensors["image_grid_thw"] = inputs["image_grid_thw"].to(torch.int64)
            kwargs = dict(pixel_values=pv, image_grid_thw=inputs["image_grid_thw"],
                          mm_token_type_ids=inputs["mm_token_type_ids"])
            with torch.no_grad():
                feats = model.model.get_image_features(pv, inputs["image_grid_thw"]).pooler_output
            tensors["image_embeds"] = torch.cat(feats, 0).float()
            pos, delta = model.model.get_rope_index(ids, inputs["mm_token_type_ids"],
                                                    image_grid_thw=inputs["image_grid_thw"])
        else:
            s = ids.shape[1]
            pos, delta = torch.arange(s).view(1, 1, -1).expand(3, 1, -1), torch.zeros(1, 1, dtype=torch.long)
        tensors["position_ids"] = pos[:, 0].to(torch.int64).contiguous()
        tensors["rope_delta"] = delta.reshape(1).to(torch.int64)

        captured = []
        hooks = [layer.register_forward_hook(lambda m, a, o: captured.append(o.detach().clone()))
                 for layer in model.model.language_model.layers]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=False, **kwargs)
            normed = model.model(input_ids=ids, **kwargs).last_hidden_state
        for h in hooks:
            h.remove()
        n_layers = len(model.model.language_model.layers)
        for i, h in enumerate(captured[:n_layers]):
            tensors[f"hidden.{i}"] = h[0].float().contiguous()
        tensors["final_hidden"] = normed[0].float().contiguous()
        tensors["logits_tail"] = out.logits[0, -TAIL:].float().contiguous()
        with torch.no_grad():
            kwargs16 = dict(kwargs)
            if "pixel_values" in kwargs16:
                kwargs16["pixel_values"] = kwargs16["pixel_values"].to(torch.bfloat16)
            out16 = model_bf16(input_ids=ids, **kwargs16)
        tensors["logits_tail_bf16"] = out16.logits[0, -TAIL:].float().contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{case['name']}.safetensors"))
        index.append({"name": case["name"], "text": text, "images": [c[0] for c in case["images"]],
                      "messages": case["messages"], "seq_len": int(ids.shape[1]), "tail": TAIL})
        print(case["name"], "seq", ids.shape[1], "grid", inputs.get("image_grid_thw"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
