"""PyTorch + PEFT anchor for `ferrotune bench train`: the same checkpoint, sequence length, LoRA targets, rank,
thread count and gradient checkpointing setting, reporting CPU seconds per sample and peak RSS.

Usage: python train_torch.py MODEL_DIR --seq 264 --steps 3 --threads 1 [--checkpointing] [--image 0]
"""

import argparse
import json
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=264)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3_5ForConditionalGeneration

    model = Qwen3_5ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
               "out_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                             exclude_modules=r".*visual.*"))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(0, min(vocab, model.config.image_token_id), (1, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100

    def step():
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()

    for _ in range(args.warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall_per_sample": wall, "cpu_per_sample": cpu, "peak_rss": rss,
                      "tokens_per_second": args.seq / wall}))


if __name__ == "__main__":
    main()
