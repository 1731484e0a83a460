"""PEFT + HF Trainer references for LoRA training on the tiny Qwen3.5 checkpoint.

Writes tests/fixtures/golden/peft/:
  samples.safetensors  token ids / labels of 8 SFT samples and the uint8 pixel levels of a 3-image pool
  samples.json         per sample: length, which pool images it uses, their grids
  init_<t>.safetensors fixed LoRA init (A and B both random, so every tensor gets a gradient), PEFT key names
  grads_<t>.safetensors gradients of every LoRA tensor for sample 0 (with an image), t in {qkvo, all}
  grads.json           the loss of that micro-batch per target set
  full_grads.json      full fine-tuning on sample 0: the loss and every parameter's gradient norm
  train.json           20 optimizer steps of HF Trainer (batch 1, accumulation 4, cosine, warmup 0.1, clipping
                       1.0, lr 1e-3, fixed sample order, targets `all`): per-step loss, learning rate, grad norm
  train_final.safetensors  the adapter after those 20 steps (and adapter/, the same saved by PEFT)

Run: tools/golden/.venv/bin/python tools/golden/gen_peft.py
"""

import json
import math
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
OUT = os.path.join(ROOT, "tests", "fixtures", "golden", "peft")

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",
       "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8
# Moderate on purpose: at 5e-3 this tiny random model is chaotic enough that f32 rounding differences between
# any two implementations grow past 1e-4 within 20 steps.
LR = 1e-3

# (user text, answer, image pool indices)
SAMPLES = [
    ("请识别并描述图片中的机器人及其特征", "这是一个白色的服务机器人，它有圆形的头部，两只机械臂。", [0]),
    ("What is in the picture?", "A red circle at the top left.", [1]),
    ("Compare these.", "The first is green, the second is blue.", [2, 0]),
    ("Say hello.", "Hello!", []),
    ("图片中有什么？", "图片中左上角有一个红色的圆形。", [2]),
    ("Describe it briefly.", "A blue robot on wheels.", [1]),
    ("Count to three.", "One, two, three.", []),
    ("What colour is the robot?", "It is yellow.", [0]),
]


def pool_image(i):
    w, h = [(96, 64), (64, 128), (128, 96)][i]
    rng = np.random.default_rng(10 + i)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 1, size=(3, 3))
    img = np.stack([255 * (c[k, 0] * x / w + c[k, 1] * y / h + c[k, 2]) / (1 + c[k].sum()) for k in range(3)], -1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def build_samples(processor):
    tok = processor.tokenizer
    pool = [pool_image(i) for i in range(3)]
    pool_inputs = [processor.image_processor(images=[im], return_tensors="pt") for im in pool]
    samples = []
    for user, answer, imgs in SAMPLES:
        content = "<|vision_start|><|image_pad|><|vision_end|>" * len(imgs) + user
        prompt = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        full = prompt + answer + "<|im_end|>\n"
        images = [pool[i] for i in imgs] or None
        enc = processor(text=[full], images=images, return_tensors="pt")
        penc = processor(text=[prompt], images=images, return_tensors="pt")
        ids = enc["input_ids"][0]
        n_prompt = penc["input_ids"].shape[1]
        labels = ids.clone()
        labels[:n_prompt] = -100
        s = {"input_ids": enc["input_ids"], "labels": labels[None], "mm_token_type_ids": enc["mm_token_type_ids"],
             "attention_mask": enc["attention_mask"], "images": imgs}
        if imgs:
            s["pixel_values"] = enc["pixel_values"]
            s["image_grid_thw"] = enc["image_grid_thw"]
        samples.append(s)
    return samples, pool_inputs


def peft_model(targets, init=None):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                     exclude_modules=r".*visual.*")
    model = get_peft_model(model, cfg)
    if init is not None:
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in init.items():
                key = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
                sd[key].copy_(v)
    return model


def lora_state(model, grads=False):
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            t = p.grad if grads else p
            out[key] = t.detach().clone().contiguous().float()
    return out


def random_init(model, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, p in lora_state(model).items():
        fan_in = p.shape[1]
        out[key] = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(fan_in)
    return out


def batch_of(s):
    b = {k: v for k, v in s.items() if k not in ("images",)}
    return b


def grad_fixtures(samples):
    losses = {}
    for name, targets in [("qkvo", QKVO), ("all", ALL)]:
        model = peft_model(targets)
        init = random_init(model, seed=3 if name == "qkvo" else 4)
        save_file(init, os.path.join(OUT, f"init_{name}.safetensors"))
        model = peft_model(targets, init)
        model.train()
        out = model(**batch_of(samples[0]))
        out.loss.backward()
        save_file(lora_state(model, grads=True), os.path.join(OUT, f"grads_{name}.safetensors"))
        losses[name] = out.loss.item()
        n = len(lora_state(model))
        print(name, "loss", losses[name], "tensors", n)
    with open(os.path.join(OUT, "grads.json"), "w") as f:
        json.dump({"loss": losses, "rank": RANK, "alpha": ALPHA, "targets": {"qkvo": QKVO, "all": ALL}}, f, indent=1)


def full_grad_fixture(samples):
    """Full fine-tuning: the L2 norm of every parameter's gradient on sample 0 (the vision tower included)."""
    from transformers import Qwen3_5ForConditionalGeneration

    model = Qwen3_5ForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32)
    model.train()
    out = model(**batch_of(samples[0]))
    out.loss.backward()
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    with open(os.path.join(OUT, "full_grads.json"), "w") as f:
        json.dump({"loss": out.loss.item(), "grad_norms": norms}, f, indent=1)
    print("full fine-tuning: loss", out.loss.item(), "tensors with grads", len(norms))


def train_fixture(samples):
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainingArguments

    order = [i % len(samples) for i in range(80)]

    class Ordered(Dataset):
        def __len__(self):
            return len(order)

        def __getitem__(self, i):
            return samples[order[i]]

    class FixedOrderTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    model = peft_model(ALL, load_file(os.path.join(OUT, "init_all.safetensors")))
    args = TrainingArguments(
        output_dir=os.path.join(OUT, "_run"), per_device_train_batch_size=1, gradient_accumulation_steps=4,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_ratio=0.1, max_grad_norm=1.0, num_train_epochs=1,
        logging_steps=1, save_strategy="no", report_to=[], seed=42, use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = FixedOrderTrainer(model=model, args=args, train_dataset=Ordered(),
                                data_collator=lambda xs: batch_of(xs[0]))
    # Same semantics as LLaMA-Factory's trainer for VLMs (and Qwen3_5ForConditionalGeneration's own
    # accepts_loss_kwargs = False): each micro-batch's mean loss divided by the micro-batches in the window.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h and "train_loss" not in h]
    steps = [{"step": h["step"], "loss": h["loss"], "learning_rate": h["learning_rate"], "grad_norm": float(h["grad_norm"]),
              "epoch": h["epoch"]} for h in logs]
    with open(os.path.join(OUT, "train.json"), "w") as f:
        json.dump({"order": order, "accumulation": 4, "lr": LR, "scheduler": "cosine", "warmup_ratio": 0.1,
                   "max_grad_norm": 1.0, "optim": args.optim, "steps": steps}, f, indent=1)
    save_file(lora_state(model), os.path.join(OUT, "train_final.safetensors"))
    # The same adapter as PEFT itself saves it (adapter_config.json + adapter_model.safetensors), for the
    # loaders and the generation fixtures.
    model.peft_config["default"].base_model_name_or_path = "tests/fixtures/tiny-qwen3_5"
    model.save_pretrained(os.path.join(OUT, "adapter"))
    os.remove(os.path.join(OUT, "adapter", "README.md"))
    print("optim", args.optim, "steps", len(steps), "first", steps[0], "last", steps[-1])
    import shutil

    shutil.rmtree(os.path.join(OUT, "_run"), ignore_errors=True)


def main():
    from transformers import AutoProcessor

    os.makedirs(OUT, exist_ok=True)
    processor = AutoProcessor.from_pretrained(CKPT)
    samples, pool_inputs = build_samples(processor)
    tensors, meta = {}, []
    for i, s in enumerate(samples):
        tensors[f"input_ids.{i}"] = s["input_ids"][0].to(torch.int64)
        tensors[f"labels.{i}"] = s["labels"][0].to(torch.int64)
        meta.append({"images": s["images"], "len": int(s["input_ids"].shape[1])})
    for i, p in enumerate(pool_inputs):
        pv = p["pixel_values"]
        k = torch.round((pv + 1.0) * 127.5)
        assert (k / 127.5 - 1.0 - pv).abs().max() <= 1e-6
        tensors[f"pool_levels.{i}"] = k.to(torch.uint8)
        tensors[f"pool_grid.{i}"] = p["image_grid_thw"][0].to(torch.int64)
    save_file(tensors, os.path.join(OUT, "samples.safetensors"))
    with open(os.path.join(OUT, "samples.json"), "w") as f:
        json.dump(meta, f, indent=1)
    grad_fixtures(samples)
    full_grad_fixture(samples)
    train_fixture(samples)


if __name__ == "__main__":
    main()
