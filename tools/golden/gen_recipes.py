"""LLaMA-Factory 0.9.5 itself (`llamafactory-cli train`) on the tiny checkpoint, for the recipes users run.

Writes tests/fixtures/golden/recipes/:
  data/                  a small ShareGPT image dataset: rows of different lengths, one row with two images of
                         different sizes, text-only rows, a multi-turn row with a system prompt
  init_adapter/          a fixed LoRA adapter (A and B random) that every recipe continues training from, so both
                         trainers start from the same weights (`adapter_name_or_path`)
  <recipe>/train.yaml    the config, exactly as `ferrotune train` reads it too
  <recipe>/trainer_log.jsonl, log_history.json, adapter_model.safetensors
                         what LLaMA-Factory wrote: its per-step log, trainer_state.json's log_history (loss,
                         grad_norm, learning_rate, eval_loss) and the final adapter
  packed.json            the rows LLaMA-Factory's loader packs the dataset into with `neat_packing: true`,
                         cutoff_len 160: input_ids, labels and the per-token sample ids of its attention mask
  numpy_permutation.json `numpy.random.default_rng(seed).permutation(n)` for a few seeds and sizes (the row order
                         of datasets' train_test_split, which `val_size` uses)

Run: tools/golden/.venv/bin/python tools/golden/gen_recipes.py
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "recipes")
VENV_BIN = os.path.dirname(sys.executable)

TARGETS = ["q_proj", "v_proj", "o_proj", "in_proj_qkv", "out_proj", "down_proj"]
RANK, ALPHA = 4, 8

IMAGES = {  # name -> (width, height, colour)
    "images/red_40x40.png": (40, 40, (200, 40, 40)),
    "images/green_96x64.png": (96, 64, (40, 180, 60)),
    "images/blue_64x128.png": (64, 128, (50, 70, 210)),
}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


ROWS = [
    {"messages": [user("<image>What colour is the robot?"), assistant("Red.")], "images": ["images/red_40x40.png"]},
    {
        "messages": [
            user("Compare <image> and <image>."),
            assistant("The first robot is green and wide; the second one is blue, tall and thin."),
        ],
        "images": ["images/green_96x64.png", "images/blue_64x128.png"],
    },
    {"messages": [user("Say hello."), assistant("Hello there, I am a robot.")]},
    {
        "messages": [
            {"role": "system", "content": "You describe robots."},
            user("<image>Describe it."),
            assistant("A tall blue robot."),
            user("Does it have wheels?"),
            assistant("No, it walks on two legs."),
        ],
        "images": ["images/blue_64x128.png"],
    },
    {
        "messages": [
            user("<image>Describe the robot in detail."),
            assistant("It is a green robot with a wide body, two short arms, a round screen and four small wheels."),
        ],
        "images": ["images/green_96x64.png"],
    },
    {"messages": [user("Count to five."), assistant("One, two, three, four, five.")]},
    {"messages": [user("<image>Is it red?"), assistant("Yes.")], "images": ["images/red_40x40.png"]},
    {
        "messages": [user("<image>What shape is its head?"), assistant("Its head is square.")],
        "images": ["images/blue_64x128.png"],
    },
    {
        "messages": [user("Which is bigger, <image> or <image>?"), assistant("The second one.")],
        "images": ["images/red_40x40.png", "images/green_96x64.png"],
    },
    {"messages": [user("Name a robot part."), assistant("An arm.")]},
]

COMMON = {
    "model_name_or_path": "../../../tiny-qwen3_5",
    "adapter_name_or_path": "../init_adapter",
    "template": "qwen3_5_nothink",
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_target": ",".join(TARGETS),
    "lora_rank": RANK,
    "lora_alpha": ALPHA,
    "dataset": "recipe_rows",
    "dataset_dir": "../data",
    "cutoff_len": 1024,
    "disable_shuffling": True,
    "seed": 42,
    "logging_steps": 1,
    "save_steps": 1000,
    "output_dir": "out",
    "overwrite_output_dir": True,
    "report_to": "none",
    "bf16": False,
    "plot_loss": False,
}

RECIPES = {
    # batch 1 x accumulation 4: 10 rows -> 3 steps an epoch (the last window holds 2 micro-batches).
    "batch1_accum4": {
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "learning_rate": 1.0e-3,
        "num_train_epochs": 3.0,
    },
    # batch 2 x accumulation 2: padding, rows of different lengths, two images of different sizes in one row,
    # text-only rows next to image rows.
    "batch2_accum2": {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1.0e-3,
        "num_train_epochs": 3.0,
    },
    # batch 4 x accumulation 1 with a held-out split evaluated every 2 steps (eval batches of 2).
    "batch4_val": {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "num_train_epochs": 3.0,
        "val_size": 0.3,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "per_device_eval_batch_size": 2,
    },
    # cosine with warmup, clipping that bites, and max_steps past the first epoch.
    "cosine_warmup_clip": {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2.0e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 2,
        "max_grad_norm": 0.05,
        "max_steps": 7,
    },
}


def yaml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def write_data():
    data = os.path.join(OUT, "data")
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    for name, (w, h, colour) in IMAGES.items():
        img = Image.new("RGB", (w, h), (250, 250, 245))
        d = ImageDraw.Draw(img)
        d.rectangle([w // 5, h // 4, w - w // 5, h - h // 8], fill=colour)
        d.ellipse([w // 3, h // 10, 2 * w // 3, h // 4 + 2], fill=(30, 30, 30))
        img.save(os.path.join(data, name))
    with open(os.path.join(data, "recipe_rows.json"), "w") as f:
        json.dump(ROWS, f, indent=1, ensure_ascii=False)
    info = {
        "recipe_rows": {
            "file_name": "recipe_rows.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    with open(os.path.join(data, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)


def write_init_adapter():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(TINY, dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B random too, so A receives a gradient from the first step
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    dst = os.path.join(OUT, "init_adapter")
    peft_model.save_pretrained(dst)
    for extra in ["README.md"]:
        if os.path.exists(os.path.join(dst, extra)):
            os.remove(os.path.join(dst, extra))
    # The base path PEFT recorded is this machine's; the relative one is what a user's folder would say.
    with open(os.path.join(dst, "adapter_config.json")) as f:
        c = json.load(f)
    c["base_model_name_or_path"] = "../../tiny-qwen3_5"
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)


def f32_copy():
    """The tiny checkpoint in float32. LLaMA-Factory loads the base in the checkpoint's own dtype whatever `bf16`
    says (torch_dtype="auto"), so on the bf16 fixture it would train in bf16 arithmetic, which no other
    implementation can follow to 1e-4. The values are the same (bf16 -> f32 is exact); both trainers get this copy
    as `model_name_or_path=` on the command line."""
    from safetensors.torch import load_file, save_file

    dst = tempfile.mkdtemp(prefix="tiny-f32-")
    for f in os.listdir(TINY):
        src = os.path.join(TINY, f)
        if f.endswith(".safetensors"):
            save_file({k: v.float() for k, v in load_file(src).items()}, os.path.join(dst, f), metadata={"format": "pt"})
        elif f == "config.json":
            with open(src) as fh:
                c = json.load(fh)
            c["dtype"] = "float32"
            c["text_config"]["dtype"] = "float32"
            c.setdefault("vision_config", {})["dtype"] = "float32"
            with open(os.path.join(dst, f), "w") as fh:
                json.dump(c, fh, indent=2)
        else:
            shutil.copy(src, os.path.join(dst, f))
    return dst


def run_recipe(name, extra, model):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    cfg = dict(COMMON, **extra)
    with open(os.path.join(d, "train.yaml"), "w") as f:
        f.write(f"# Recipe `{name}`: written by tools/golden/gen_recipes.py; LLaMA-Factory 0.9.5 and ferrotune read it.\n")
        for k, v in cfg.items():
            f.write(f"{k}: {yaml_value(v)}\n")
    env = dict(
        os.environ,
        DISABLE_VERSION_CHECK="1",
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="lf-cache-"),
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    out = os.path.join(d, "out")
    shutil.rmtree(out, ignore_errors=True)
    log = subprocess.run(
        [os.path.join(VENV_BIN, "llamafactory-cli"), "train", "train.yaml", f"model_name_or_path={model}"],
        cwd=d,
        env=env,
        capture_output=True,
        text=True,
    )
    if log.returncode != 0:
        print(log.stdout[-5000:], log.stderr[-10000:])
        raise SystemExit(f"{name}: llamafactory-cli failed")
    shutil.copy(os.path.join(out, "trainer_log.jsonl"), os.path.join(d, "trainer_log.jsonl"))
    shutil.copy(os.path.join(out, "adapter_model.safetensors"), os.path.join(d, "adapter_model.safetensors"))
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    with open(os.path.join(d, "log_history.json"), "w") as f:
        json.dump(
            {
                "max_steps": state["max_steps"],
                "num_train_epochs": state["num_train_epochs"],
                "log_history": state["log_history"],
            },
            f,
            indent=1,
        )
    shutil.rmtree(out)
    steps = [e for e in state["log_history"] if "loss" in e]
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    print(f"{name}: {len(steps)} steps, {len(evals)} evaluations, final loss {steps[-1]['loss']}")


def write_permutations():
    cases = []
    for seed in [0, 1, 42, 1234, 2**32 + 7]:
        for n in [1, 2, 3, 10, 37, 1000]:
            cases.append({"seed": seed, "n": n, "permutation": np.random.default_rng(seed).permutation(n).tolist()})
    with open(os.path.join(OUT, "numpy_permutation.json"), "w") as f:
        json.dump({"numpy": np.__version__, "cases": cases}, f)


def write_packed():
    """LLaMA-Factory's own loader and packed processor (in this process: it reads data, never trains)."""
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lf-cache-")
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(
        model_name_or_path=TINY,
        template="qwen3_5_nothink",
        stage="sft",
        do_train=True,
        finetuning_type="lora",
        dataset="recipe_rows",
        dataset_dir=os.path.join(OUT, "data"),
        cutoff_len=160,
        neat_packing=True,
        output_dir=tempfile.mkdtemp(prefix="lf-out-"),
        overwrite_output_dir=True,
        overwrite_cache=True,
        report_to="none",
        use_cpu=True,
    )
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tm = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
    ds = get_dataset(template, model_args, data_args, training_args, stage="sft", **tm)["train_dataset"]
    rows = [
        {
            "input_ids": list(r["input_ids"]),
            "labels": list(r["labels"]),
            "attention_mask": list(r["attention_mask"]),
            "images": len(r["images"] or []),
        }
        for r in ds
    ]
    with open(os.path.join(OUT, "packed.json"), "w") as f:
        json.dump({"cutoff_len": 160, "rows": rows}, f)
    print(f"packed: {len(rows)} rows")


def main():
    os.makedirs(OUT, exist_ok=True)
    if sys.argv[1:] == ["packed"]:
        write_packed()
        return
    write_permutations()
    write_data()
    write_init_adapter()
    write_packed()
    only = sys.argv[1:]
    model = f32_copy()
    for name, extra in RECIPES.items():
        if not only or name in only:
            run_recipe(name, extra, model)
    shutil.rmtree(model)


if __name__ == "__main__":
    main()
