"""Reference chat-template renderings and processor token ids for the tiny checkpoint.

For each conversation: the text transformers renders with the checkpoint's own chat template (with the given
add_generation_prompt / enable_thinking), the image sizes and grids, and the processor's input_ids after
<|image_pad|> expansion.

Run: tools/golden/.venv/bin/python tools/golden/gen_chat.py
"""

import json
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "chat.json")

IMG = {"type": "image"}


def txt(t):
    return {"type": "text", "text": t}


CASES = [
    dict(name="system_single_turn", gen=True, thinking=None, sizes=[],
         messages=[{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Hello! 你好"}]),
    dict(name="multi_turn_no_thinking", gen=True, thinking=False, sizes=[],
         messages=[{"role": "user", "content": "What is 2+2?"},
                   {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3+3?"}]),
    dict(name="one_image_thinking", gen=True, thinking=True, sizes=[(200, 150)],
         messages=[{"role": "user", "content": [IMG, txt("请识别并描述图片中的机器人及其特征")]}]),
    dict(name="two_images_sizes", gen=True, thinking=False, sizes=[(64, 64), (300, 90)],
         messages=[{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [txt("Compare "), IMG, txt(" with "), IMG]}]),
    dict(name="tall_image_history", gen=True, thinking=None, sizes=[(40, 400)],
         messages=[{"role": "user", "content": [IMG, txt("What is this?")]},
                   {"role": "assistant", "content": "<think>\nIt looks tall.\n</think>\n\nA tall picture."},
                   {"role": "user", "content": "Why?"}]),
    dict(name="training_sample_no_prompt", gen=False, thinking=None, sizes=[(128, 96)],
         messages=[{"role": "user", "content": [IMG, txt("Describe it.")]},
                   {"role": "assistant", "content": "这是一个白色的服务机器人。"}]),
    dict(name="huge_image", gen=True, thinking=False, sizes=[(1600, 1200)],
         messages=[{"role": "user", "content": [IMG, txt("Huge.")]}]),
    dict(name="reasoning_in_last_turn", gen=False, thinking=None, sizes=[],
         messages=[{"role": "user", "content": "Think about it."},
                   {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone."}]),
]


def main():
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(CKPT)
    out = []
    for case in CASES:
        kwargs = {}
        if case["thinking"] is not None:
            kwargs["enable_thinking"] = case["thinking"]
        text = processor.apply_chat_template(case["messages"], tokenize=False,
                                             add_generation_prompt=case["gen"], **kwargs)
        images = [Image.new("RGB", s, (120, 80, 200)) for s in case["sizes"]]
        inputs = processor(text=[text], images=images or None, return_tensors="pt")
        grids = inputs["image_grid_thw"].tolist() if images else []
        out.append({"name": case["name"], "messages": case["messages"], "add_generation_prompt": case["gen"],
                    "enable_thinking": case["thinking"], "image_sizes": case["sizes"], "image_grid_thw": grids,
                    "text": text, "input_ids": inputs["input_ids"][0].tolist()})
        print(case["name"], len(out[-1]["input_ids"]), grids)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
