"""Writes the data-stage reference fixtures with LLaMA-Factory 0.9.5's own code (pinned in requirements.txt).

1. tests/fixtures/data/: small datasets in every format the data stage reads (alpaca, sharegpt with from/value and
   role/content tags, thinking data, images of several sizes, tool calls in sharegpt and openai rows) with their
   dataset_info.json and PNG images, and
   tests/fixtures/data/reference_run/: the reference run's config, dataset_info.json and row shape (role/content
   messages without a `tags` block, images without `<image>` placeholders).
2. tests/fixtures/golden/lf/samples_<case>.json: `input_ids` and `labels` that LLaMA-Factory's loader, converter,
   template and supervised processor produce on the tiny checkpoint's tokenizer and processor, per template and
   option. The reference-run rows are not valid LLaMA-Factory input as they are; they are run through LLaMA-Factory
   after the two fixes ferrotune applies (role/content tags, one `<image>` per image before the first user message).
3. tests/fixtures/golden/lf/prompts.json: generation prompts (`encode_oneturn`, as LLaMA-Factory's chat engines).
4. tests/fixtures/golden/lf/image_tokens.json: image-token counts after LLaMA-Factory's pre-resize and the HF
   image processor.
5. tests/fixtures/golden/lf/steps.json: optimizer steps from a real HF Trainer (transformers 5.5.4).
6. tests/fixtures/golden/lf/keys.json: every config key LLaMA-Factory accepts, with its default.

Run: tools/golden/.venv/bin/python tools/golden/gen_lf.py
"""

import copy
import dataclasses
import enum
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
DATA = os.path.join(ROOT, "tests", "fixtures", "data")
REF = os.path.join(DATA, "reference_run")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "lf")

os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lf-cache-")

from PIL import Image  # noqa: E402

# ---------------------------------------------------------------------------------------------------- data fixtures

IMAGES = {  # file -> (width, height, colour)
    "images/robot_64x48.png": (64, 48, (200, 30, 30)),
    "images/robot_300x200.png": (300, 200, (30, 160, 40)),
    "images/robot_500x120.png": (500, 120, (40, 60, 200)),
    "images/robot_1000x700.png": (1000, 700, (220, 220, 220)),
}
REF_IMAGES = {"robot_001.png": (640, 480, (250, 250, 250)), "robot_002.png": (120, 90, (240, 200, 20))}

ALPACA_TEXT = [
    {"instruction": "Name the robot's main colour.", "input": "", "output": "The robot is mostly white."},
    {
        "instruction": "Summarise the text.",
        "input": "The robot has two arms and a screen on its chest.",
        "output": "A two-armed robot with a chest screen.",
        "system": "You are a concise assistant.",
    },
    {
        "instruction": "And how does it move?",
        "input": "",
        "output": "It rolls on three wheels.",
        "history": [["What is this robot for?", "It guides visitors in a museum."], ["Is it tall?", "About 1.2 metres."]],
    },
]
SHAREGPT_FV = [
    {"conversations": [{"from": "human", "value": "Hello, who are you?"}, {"from": "gpt", "value": "I am a robot assistant."}]},
    {
        "conversations": [
            {"from": "system", "value": "Answer in one sentence."},
            {"from": "human", "value": "What does the robot carry?"},
            {"from": "gpt", "value": "It carries a tray of drinks."},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "Four glasses."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "Check the battery."},
            {"from": "gpt", "value": "Checking the battery level now."},
            {"from": "observation", "value": "{\"battery\": 87}"},
            {"from": "gpt", "value": "The battery is at 87 percent."},
        ]
    },
    {
        "conversations": [
            {"from": "human", "value": "请识别并描述图片中的机器人及其特征"},
            {"from": "gpt", "value": "这是一个白色的服务机器人，有两个手臂。"},
        ]
    },
]
COT = [
    {
        "messages": [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "<think>\nAdd two and three.\n</think>\n\n2+3 = 5."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Is the robot on?"},
            {"role": "assistant", "content": "<think>\nThe light is green.\n</think>\n\nYes, it is on."},
            {"role": "user", "content": "And the arm?"},
            {"role": "assistant", "content": "The arm is folded."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Think briefly."},
            {"role": "user", "content": "Which wheel is broken?"},
            {"role": "assistant", "content": "The left wheel."},
        ]
    },
]
MLLM_RC = [
    {
        "messages": [
            {"role": "user", "content": "<image>What colour is the robot?"},
            {"role": "assistant", "content": "It is white with blue stripes."},
        ],
        "images": ["images/robot_64x48.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "Compare <image> and <image>."},
            {"role": "assistant", "content": "The first robot is smaller than the second."},
        ],
        "images": ["images/robot_300x200.png", "images/robot_500x120.png"],
    },
    {
        "messages": [
            {"role": "system", "content": "You describe robots."},
            {"role": "user", "content": "<image>Describe it."},
            {"role": "assistant", "content": "A tall robot with a round head."},
            {"role": "user", "content": "What is it holding?<image>"},
            {"role": "assistant", "content": "A small box."},
        ],
        "images": ["images/robot_1000x700.png", "images/robot_64x48.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "No picture this time: what is a servo?"},
            {"role": "assistant", "content": "A motor with position control."},
        ]
    },
]
ALPACA_IMG = [
    {"instruction": "<image>Describe the robot.", "output": "A white service robot.", "images": ["images/robot_300x200.png"]}
]
MLLM_ROBOT = [
    {
        "messages": [
            {"role": "user", "content": "请识别并描述图片中的机器人及其特征"},
            {"role": "assistant", "content": "这是一个白色的服务机器人，头部有显示屏，底部有轮子。"},
        ],
        "images": ["robot_001.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "Describe the robot in this picture."},
            {"role": "assistant", "content": "A small yellow robot with two arms."},
        ],
        "images": ["robot_002.png"],
    },
]
# Tool definitions in both shapes LLaMA-Factory reads: bare, and wrapped as OpenAI function tools.
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}
BATTERY = {
    "type": "function",
    "function": {
        "name": "read_battery",
        "description": "Battery level of a robot, in percent.",
        "parameters": {"type": "object", "properties": {"robot": {"type": "string"}}, "required": ["robot"]},
    },
}


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


# The `tools` column as JSON text; `function_call` values: one call, a list of calls, a call behind a think block
# and inside <tool_call> tags with text around it. Row 2's empty tool list still opens a system turn.
TOOLS_SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "What is R2's battery level?"},
            {"from": "function_call", "value": json.dumps(call("read_battery", robot="R2"))},
            {"from": "observation", "value": "{\"level\": 87}"},
            {"from": "gpt", "value": "R2 is at 87 percent."},
        ],
        "system": "You control service robots.",
        "tools": json.dumps([WEATHER, BATTERY]),
    },
    {
        "conversations": [
            {"from": "human", "value": "Weather in Zürich and 北京?"},
            {
                "from": "function_call",
                "value": json.dumps([call("get_weather", city="Zürich", unit="celsius"), call("get_weather", city="北京")],
                                    ensure_ascii=False),
            },
            {"from": "observation", "value": "Zürich: 12 °C\n北京: 20 °C"},
            {"from": "gpt", "value": "Zürich has 12 °C, 北京 20 °C."},
        ],
        "tools": json.dumps([WEATHER], ensure_ascii=False),
    },
    {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}], "tools": "[]"},
    {
        "conversations": [
            {"from": "human", "value": "Is R2 busy?"},
            {"from": "gpt", "value": "No, it is idle."},
            {"from": "human", "value": "Send it to dock 3 at 1.5 m/s."},
            {
                "from": "function_call",
                "value": "<think>\nDock 3, slowly.\n</think>\n\n"
                + json.dumps(call("move", robot="R2", target={"dock": 3, "lane": None}, speed=1.5, avoid=["stairs"])),
            },
            {"from": "observation", "value": "arrived"},
            {"from": "function_call", "value": "Now charging.<tool_call>" + json.dumps(call("charge", robot="R2")) + "</tool_call>"},
            {"from": "observation", "value": "charging"},
            {"from": "gpt", "value": "R2 is at dock 3 and charging."},
        ]
    },
]
# The openai formatting: a parsed `tools` list (the same in every row: Arrow would add the other rows' keys to a
# differing one), `tool_calls` with object arguments (same keys in every call, for the same reason), `role: tool`
# results merged into one observation, and an assistant text next to tool calls that LLaMA-Factory drops.
TOOLS_OPENAI = [
    {
        "messages": [
            {"role": "system", "content": "You report the weather."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": call("get_weather", city="Paris", unit="celsius")}]},
            {"role": "tool", "content": "18 °C, cloudy"},
            {"role": "assistant", "content": "Paris: 18 °C and cloudy."},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    },
    {
        "messages": [
            {"role": "user", "content": "Compare Oslo and Lima."},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [
                {"id": "c2", "type": "function", "function": call("get_weather", city="Oslo", unit="celsius")},
                {"id": "c3", "type": "function", "function": call("get_weather", city="Lima", unit="fahrenheit")}]},
            {"role": "tool", "content": "-2 °C"},
            {"role": "tool", "content": "68 °F"},
            {"role": "assistant", "content": "Oslo is far colder."},
        ],
        "tools": [{"type": "function", "function": WEATHER}],
    },
]
RC_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
DATASET_INFO = {
    "alpaca_text": {
        "file_name": "alpaca_text.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"},
    },
    "sharegpt_fv": {"file_name": "sharegpt_fv.json", "formatting": "sharegpt"},
    "cot": {
        "file_name": "cot.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {**RC_TAGS, "system_tag": "system"},
    },
    "mllm_rc": {
        "file_name": "mllm_rc.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {**RC_TAGS, "system_tag": "system"},
    },
    "alpaca_img": {
        "file_name": "alpaca_img.jsonl",
        "columns": {"prompt": "instruction", "response": "output", "images": "images"},
    },
    "tools_sharegpt": {
        "file_name": "tools_sharegpt.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    },
    "tools_openai": {
        "file_name": "tools_openai.json",
        "formatting": "openai",
        "columns": {"messages": "messages", "tools": "tools"},
        "tags": {**RC_TAGS, "observation_tag": "tool", "system_tag": "system"},
    },
}
# The reference run's dataset_info.json, verbatim from the issue.
REF_INFO = {
    "mllm_robot": {
        "file_name": "mllm_robot.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
    }
}
# The reference run's config; only the paths differ.
REF_YAML = """\
model_name_or_path: ../../tiny-qwen3_5
template: qwen
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: lora
lora_target: q_proj,k_proj,v_proj,o_proj
dataset: mllm_robot
learning_rate: 1.0e-4
num_train_epochs: 5.0
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
bf16: true
output_dir: saves/tiny-qwen3_5/lora
logging_steps: 10
save_steps: 500
overwrite_output_dir: true
"""


def dump(path, obj, lines=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(obj, dict) and "samples" in obj:  # one compact line per sample keeps fixtures small
            head = {k: v for k, v in obj.items() if k != "samples"}
            f.write((json.dumps(head, ensure_ascii=False)[:-1] + ", " if head else "{") + '"samples": [\n')
            f.write(",\n".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")) for x in obj["samples"]))
            f.write("\n]}\n")
        elif lines:
            for row in obj:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")


def write_data_fixtures():
    for base, images in ((DATA, IMAGES), (os.path.join(REF, "data"), REF_IMAGES)):
        for name, (w, h, colour) in images.items():
            path = os.path.join(base, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.new("RGB", (w, h), colour).save(path, optimize=True)
    dump(os.path.join(DATA, "alpaca_text.json"), ALPACA_TEXT)
    dump(os.path.join(DATA, "sharegpt_fv.json"), SHAREGPT_FV)
    dump(os.path.join(DATA, "cot.json"), COT)
    dump(os.path.join(DATA, "mllm_rc.json"), MLLM_RC)
    dump(os.path.join(DATA, "alpaca_img.jsonl"), ALPACA_IMG, lines=True)
    dump(os.path.join(DATA, "tools_sharegpt.json"), TOOLS_SHAREGPT)
    dump(os.path.join(DATA, "tools_openai.json"), TOOLS_OPENAI)
    dump(os.path.join(DATA, "dataset_info.json"), DATASET_INFO)
    dump(os.path.join(REF, "data", "dataset_info.json"), REF_INFO)
    dump(os.path.join(REF, "data", "mllm_robot.json"), MLLM_ROBOT)
    with open(os.path.join(REF, "train_qwen.yaml"), "w") as f:
        f.write(REF_YAML)


def fixed_reference_copy():
    """The reference rows as LLaMA-Factory accepts them: a `tags` block and `<image>` before the first user message."""
    tmp = tempfile.mkdtemp(prefix="lf-ref-")
    rows = copy.deepcopy(MLLM_ROBOT)
    for r in rows:
        first_user = next(m for m in r["messages"] if m["role"] == "user")
        first_user["content"] = "<image>" * len(r["images"]) + first_user["content"]
    dump(os.path.join(tmp, "mllm_robot.json"), rows)
    info = copy.deepcopy(REF_INFO)
    info["mllm_robot"]["tags"] = {**RC_TAGS, "system_tag": "system"}
    dump(os.path.join(tmp, "dataset_info.json"), info)
    return tmp


# ---------------------------------------------------------------------------------------------------- LLaMA-Factory

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer  # noqa: E402
from llamafactory.data.template import TEMPLATES  # noqa: E402
from llamafactory.hparams import (  # noqa: E402
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
    TrainingArguments,
    get_train_args,
)
from llamafactory.model import load_tokenizer  # noqa: E402

PRISTINE = copy.deepcopy(TEMPLATES)
TEXT = ["alpaca_text", "sharegpt_fv", "cot"]
IMAGE = ["mllm_rc", "alpaca_img"]
TOOLS = ["tools_sharegpt", "tools_openai"]

# (case name, template, datasets, extra args). Text templates only get text data: LLaMA-Factory refuses images
# without a vision plugin.
CASES = [
    ("qwen3_5", "qwen3_5", TEXT + IMAGE, {}),
    ("qwen3_5_nothink", "qwen3_5_nothink", TEXT + IMAGE, {}),
    ("qwen3_vl", "qwen3_vl", TEXT + IMAGE, {}),
    ("qwen3_vl_nothink", "qwen3_vl_nothink", TEXT + IMAGE, {}),
    ("qwen2_vl", "qwen2_vl", TEXT + IMAGE, {}),
    ("qwen", "qwen", TEXT, {}),
    ("qwen3", "qwen3", TEXT, {}),
    ("qwen3_nothink", "qwen3_nothink", TEXT, {}),
    ("qwen3_5_thinking_off", "qwen3_5", ["cot", "mllm_rc"], {"enable_thinking": False}),
    ("qwen3_5_thinking_mixed", "qwen3_5", ["cot"], {"enable_thinking": None}),
    ("qwen3_mask_history", "qwen3", ["cot", "sharegpt_fv"], {"mask_history": True}),
    ("qwen3_5_preserve_thinking", "qwen3_5", ["cot"], {"mask_history": True, "preserve_thinking": True}),
    ("qwen3_5_nothink_train_on_prompt", "qwen3_5_nothink", ["alpaca_text", "mllm_rc"], {"train_on_prompt": True}),
    ("qwen3_5_nothink_cutoff", "qwen3_5_nothink", TEXT, {"cutoff_len": 24}),
    ("qwen3_5_cutoff_images", "qwen3_5", ["mllm_rc"], {"cutoff_len": 60}),
    ("qwen2_vl_default_system", "qwen2_vl", ["sharegpt_fv", "mllm_rc"], {"default_system": "Be brief."}),
    ("qwen3_5_small_images", "qwen3_5_nothink", ["mllm_rc"], {"image_max_pixels": 16384, "image_min_pixels": 4096}),
    # Tool calling: the qwen3_5 and qwen tool formats, reasoning or not, a default system prompt.
    ("tools_qwen3_5_nothink", "qwen3_5_nothink", TOOLS, {}),
    ("tools_qwen3_5", "qwen3_5", TOOLS, {}),
    ("tools_qwen3_vl_nothink", "qwen3_vl_nothink", TOOLS, {}),
    ("tools_qwen", "qwen", ["tools_sharegpt"], {}),
    ("tools_qwen3_thinking_off", "qwen3", ["tools_sharegpt"], {"enable_thinking": False}),
]
REFERENCE_CASES = [
    ("reference_qwen3_5", "qwen3_5", {}),
    ("reference_qwen3_5_nothink", "qwen3_5_nothink", {}),
]


def run_lf(template, dataset, dataset_dir, media_dir, extra):
    TEMPLATES.clear()
    TEMPLATES.update(copy.deepcopy(PRISTINE))
    args = dict(
        model_name_or_path=TINY,
        template=template,
        stage="sft",
        do_train=True,
        finetuning_type="lora",
        dataset=dataset,
        dataset_dir=dataset_dir,
        media_dir=media_dir,
        cutoff_len=2048,
        output_dir=tempfile.mkdtemp(prefix="lf-out-"),
        overwrite_output_dir=True,
        overwrite_cache=True,
        report_to="none",
        use_cpu=True,
    )
    args.update(extra)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tm = load_tokenizer(model_args)
    template_obj = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
    ds = get_dataset(template_obj, model_args, data_args, training_args, stage="sft", **tm)["train_dataset"]
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds], tm


def image_cut(sample, images, pad_id, tokens_per_image):
    return sample["input_ids"].count(pad_id) != sum(tokens_per_image[i] for i in images)


def pad_runs(ids, pad):
    """Lengths of the runs of `pad` in `ids`, in order: one per image."""
    counts, prev = [], None
    for k, t in enumerate(ids):
        if t == pad:
            if prev is None or k != prev + 1:
                counts.append(0)
            counts[-1] += 1
            prev = k
    return counts


def gen_samples():
    rows_of = {"alpaca_text": ALPACA_TEXT, "sharegpt_fv": SHAREGPT_FV, "cot": COT, "mllm_rc": MLLM_RC,
               "alpaca_img": ALPACA_IMG, "tools_sharegpt": TOOLS_SHAREGPT, "tools_openai": TOOLS_OPENAI}
    tokens_of = {}  # image file -> pads, from the first (untruncated, default-size) case
    for name, template, datasets, extra in CASES:
        samples = []
        for ds in datasets:
            out, tm = run_lf(template, ds, DATA, DATA, extra)
            rows = rows_of[ds]
            assert len(out) == len(rows), (name, ds, len(out), len(rows))
            pad = tm["tokenizer"].convert_tokens_to_ids("<|image_pad|>")
            for i, (s, row) in enumerate(zip(out, rows)):
                imgs = row.get("images", [])
                if not extra:
                    for img, c in zip(imgs, pad_runs(s["input_ids"], pad)):
                        tokens_of.setdefault(img, c)
                # LLaMA-Factory cuts image tokens with a small cutoff_len; ferrotune drops such rows instead.
                cut = "cutoff_len" in extra and bool(imgs) and sum(pad_runs(s["input_ids"], pad)) != sum(
                    tokens_of[img] for img in imgs)
                samples.append({"dataset": ds, "row": i, **s, "image_cut": cut})
        args = {"template": template, "dataset": ",".join(datasets), **extra}
        dump(os.path.join(OUT, f"samples_{name}.json"), {"case": name, "args": args, "samples": samples})
        print(f"{name}: {len(samples)} samples")
    fixed = fixed_reference_copy()
    for name, template, extra in REFERENCE_CASES:
        out, _ = run_lf(template, "mllm_robot", fixed, os.path.join(REF, "data"), extra)
        samples = [{"dataset": "mllm_robot", "row": i, **s, "image_cut": False} for i, s in enumerate(out)]
        args = {"template": template, "dataset": "mllm_robot", "dataset_dir": "reference_run/data", **extra}
        dump(os.path.join(OUT, f"samples_{name}.json"), {"case": name, "args": args, "samples": samples})
        print(f"{name}: {len(samples)} samples")


def gen_prompts():
    """Generation prompts as LLaMA-Factory's chat engines build them (encode_oneturn with an empty answer)."""
    convs = [
        {"system": None, "messages": [{"role": "user", "content": "Describe the robot."}]},
        {
            "system": "You describe robots.",
            "messages": [
                {"role": "user", "content": "Is it on?"},
                {"role": "assistant", "content": "<think>\nGreen light.\n</think>\n\nYes."},
                {"role": "user", "content": "And now?"},
            ],
        },
    ]
    out = []
    for template in ["qwen3_5", "qwen3_5_nothink", "qwen2_vl", "qwen", "qwen3"]:
        for thinking in [True, False]:
            TEMPLATES.clear()
            TEMPLATES.update(copy.deepcopy(PRISTINE))
            data_args = DataArguments(template=template, enable_thinking=thinking)
            tokenizer = load_tokenizer(ModelArguments(model_name_or_path=TINY))["tokenizer"]
            t = get_template_and_fix_tokenizer(tokenizer, data_args)
            for c in convs:
                msgs = c["messages"] + [{"role": "assistant", "content": ""}]
                prompt, _ = t.encode_oneturn(tokenizer, msgs, c["system"])
                out.append({"template": template, "enable_thinking": thinking, **c, "prompt_ids": prompt})
    dump(os.path.join(OUT, "prompts.json"), {"samples": out})


def gen_image_tokens():
    """Pads per image after LLaMA-Factory's pre-resize (Qwen3-VL plugin) and the HF image processor."""
    TEMPLATES.clear()
    TEMPLATES.update(copy.deepcopy(PRISTINE))
    tm = load_tokenizer(ModelArguments(model_name_or_path=TINY))
    processor = tm["processor"]
    plugin = TEMPLATES["qwen3_5"].mm_plugin
    merge = processor.image_processor.merge_size
    cases = []
    for w, h, mx, mn in [
        (64, 48, 589824, 1024), (300, 200, 589824, 1024), (500, 120, 589824, 1024), (1000, 700, 589824, 1024),
        (1024, 768, 262144, 1024), (48, 80, 589824, 1024), (10, 20, 589824, 1024), (17, 900, 589824, 1024),
        (2000, 9, 589824, 1024), (4000, 3000, 589824, 1024), (333, 777, 16384, 4096), (640, 480, 589824, 1024),
        (120, 90, 589824, 1024), (96, 2400, 589824, 1024),
    ]:
        img = Image.new("RGB", (w, h), (10, 20, 30))
        regular = plugin._regularize_images([img], image_max_pixels=mx, image_min_pixels=mn)["images"][0]
        grid = processor.image_processor([regular], return_tensors="pt")["image_grid_thw"][0]
        tokens = int(grid.prod()) // merge**2
        cases.append({"width": w, "height": h, "image_max_pixels": mx, "image_min_pixels": mn,
                      "preresized": [regular.width, regular.height], "grid_thw": [int(x) for x in grid], "tokens": tokens})
    dump(os.path.join(OUT, "image_tokens.json"), cases)


def gen_steps():
    """Optimizer steps from a real HF Trainer: set_initial_training_values, get_warmup_steps, compute_steps."""
    import torch
    from transformers import Trainer
    from transformers import TrainingArguments as HfArgs
    from transformers.trainer_callback import TrainerState

    class Rows(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"x": torch.zeros(1)}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def forward(self, x):
            return {"loss": self.lin(x).sum()}

    combos = [
        # samples, batch, accum, epochs, max_steps, drop_last, warmup_steps, logging_steps, save_steps
        (450, 1, 16, 5.0, -1, False, 0.1, 10, 500),  # the reference run
        (100, 8, 1, 3.0, -1, False, 0, 5, 0.25),
        (1000, 4, 4, 2.5, -1, False, 20, 0.05, 100),
        (7, 2, 3, 1.0, -1, False, 0.5, 1, 1),
        (33, 8, 2, 0.5, -1, True, 0, 0.5, 500),
        (450, 1, 16, 5.0, 100, False, 0.1, 10, 0.3),
        (50, 4, 1, 3.0, -1, True, 3, 2, 10),
        (2, 1, 16, 5.0, -1, False, 0, 10, 500),  # the reference rows of the test fixture
    ]
    out = []
    for n, bs, ga, ep, ms, drop, warm, log, save in combos:
        args = HfArgs(output_dir=tempfile.mkdtemp(prefix="lf-steps-"), per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, num_train_epochs=ep, max_steps=ms, dataloader_drop_last=drop,
                      warmup_steps=warm, logging_steps=log, save_steps=save, use_cpu=True, report_to="none")
        trainer = Trainer(model=Model(), args=args, train_dataset=Rows(n))
        epochs, per_epoch, _, _, total_batch, batches, max_steps = trainer.set_initial_training_values(
            args, trainer.get_train_dataloader())
        state = TrainerState()
        state.compute_steps(args, max_steps)
        out.append({
            "samples": n, "per_device_train_batch_size": bs, "gradient_accumulation_steps": ga,
            "num_train_epochs": ep, "max_steps": ms, "dataloader_drop_last": drop, "warmup_steps": warm,
            "logging_steps": log, "save_steps": save,
            "expected": {"batches_per_epoch": batches, "steps_per_epoch": per_epoch, "epochs": epochs,
                         "total_steps": max_steps, "effective_batch": total_batch,
                         "warmup_steps": args.get_warmup_steps(max_steps),
                         "logging_steps": int(state.logging_steps), "save_steps": int(state.save_steps)},
        })
        print("steps", n, bs, ga, ep, ms, "->", max_steps)
    assert out[0]["expected"]["total_steps"] == 145, out[0]
    dump(os.path.join(OUT, "steps.json"), out)


def gen_keys():
    """Every key LLaMA-Factory's train parser accepts (its five dataclasses) with the dataclass default."""
    keys = {}
    for cls in [ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments]:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                d = f.default
            elif f.default_factory is not dataclasses.MISSING:
                d = f.default_factory()
            else:
                d = None
            if isinstance(d, enum.Enum):
                d = d.value
            keys[f.name] = d
    dump(os.path.join(OUT, "keys.json"), keys)


if __name__ == "__main__":
    write_data_fixtures()
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    gen_keys()
    gen_steps()
    gen_image_tokens()
    gen_prompts()
    gen_samples()
    import llamafactory
    import transformers

    print("llamafactory", llamafactory.__version__, "transformers", transformers.__version__)
