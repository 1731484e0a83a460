"""Python anchors for `ferrotune bench`: the same checkpoint, lengths, LoRA setup and threads in PyTorch +
transformers (+ PEFT for training), reporting wall and CPU seconds per sample (per token for decode) and peak
RSS as one JSON line.

Usage: python anchor.py {train,forward,decode} MODEL_DIR [--seq 264] [--steps 3] [--threads 1]
                        [--rank 8] [--checkpointing] [--new-tokens 64]
"""

import argparse
import json
import resource
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
           "out_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "forward", "decode"])
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=264)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Qwen3_5ForConditionalGeneration

    model = Qwen3_5ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    vocab = min(model.config.text_config.vocab_size, model.config.image_token_id)
    ids = torch.randint(0, vocab, (1, args.seq), generator=g)

    if args.what == "train":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                 exclude_modules=r".*visual.*"))
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        labels = ids.clone()
        labels[:, : args.seq // 2] = -100

        def once():
            model(input_ids=ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()

        per = args.steps
    elif args.what == "forward":
        model.eval()

        def once():
            with torch.no_grad():
                model(input_ids=ids)

        per = args.steps
    else:
        model.eval()

        def gen(n):
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        gen(2)
        t0, c0 = time.perf_counter(), time.process_time()
        gen(1)
        ttft, cpu_first = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        gen(args.new_tokens)
        wall = (time.perf_counter() - t0 - ttft) / (args.new_tokens - 1)
        cpu = (time.process_time() - c0 - cpu_first) / (args.new_tokens - 1)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"wall_per_sample": wall, "cpu_per_sample": cpu, "peak_rss": rss, "ttft": ttft}))
        return

    once()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(per):
        once()
    wall, cpu = (time.perf_counter() - t0) / per, (time.process_time() - c0) / per
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall_per_sample": wall, "cpu_per_sample": cpu, "peak_rss": rss}))


if __name__ == "__main__":
    main()
