"""Python anchors for `ferrotune bench`: the same checkpoint, lengths, LoRA setup and threads in PyTorch +
transformers (+ PEFT for training), reporting wall and CPU seconds per sample (per token for decode) and peak
RSS as one JSON line.

Usage: python anchor.py {train,forward,decode} MODEL_DIR [--seq 264] [--steps 3] [--threads 1] [--batch 1]
                        [--rank 8] [--checkpointing] [--new-tokens 64] [--image 0] [--device cpu] [--bf16]
                        [--adapters 0]

`decode --adapters N` serves N random PEFT adapters side by side: row i of the batch takes adapter i mod N
(PEFT's mixed-adapter batches, `generate(adapter_names=...)`).

On a GPU (`--device cuda`) times include a synchronisation and `peak_gpu` is torch's max_memory_allocated;
with `--bf16` the base weights are bf16 while PEFT keeps the adapters in f32 (as LLaMA-Factory trains).
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
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (decode)")
    ap.add_argument("--adapters", type=int, default=0, help="random adapters served side by side (decode)")
    ap.add_argument("--image", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_rss():
        # VmHWM is this process's own high-water mark: ru_maxrss keeps the parent's peak across fork + exec, so
        # under `ferrotune bench --python` it would report ferrotune's peak when that is larger.
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report():
        rss = peak_rss()
        out = {"peak_rss": rss, "device": "cpu"}
        if cuda:
            out.update(peak_gpu=torch.cuda.max_memory_allocated(), device=torch.cuda.get_device_name())
        return out

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import Qwen3_5ForConditionalGeneration

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    t_load = time.perf_counter()
    model = Qwen3_5ForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(dev)
    load_s = time.perf_counter() - t_load
    g = torch.Generator().manual_seed(1)
    vocab = min(model.config.text_config.vocab_size, model.config.image_token_id)
    ids = torch.randint(0, vocab, (1, args.seq), generator=g)
    image = {}
    if args.image:
        # The same synthetic layout as `ferrotune bench`: one square image right after the first two tokens.
        v = model.config.vision_config
        side = args.image // v.patch_size
        side -= side % v.spatial_merge_size
        n_tok = side * side // v.spatial_merge_size ** 2
        ids[0, 2:2 + n_tok] = model.config.image_token_id
        feat = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        image = {"pixel_values": (torch.rand(side * side, feat, generator=g) * 2 - 1).to(dev, dtype),
                 "image_grid_thw": torch.tensor([[1, side, side]], device=dev),
                 "mm_token_type_ids": (ids == model.config.image_token_id).long().to(dev)}
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    labels[ids == model.config.image_token_id] = -100
    ids, labels = ids.to(dev), labels.to(dev)

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

        def once():
            model(input_ids=ids, labels=labels, **image).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()

        per = args.steps
    elif args.what == "forward":
        model.eval()

        def once():
            with torch.no_grad():
                model(input_ids=ids, **image)

        per = args.steps
    else:
        model.eval()

        # --batch sequences of the same prompt decode together (one generate() call on a batch).
        batch_ids = ids.repeat(args.batch, 1)
        extra = {}
        if args.adapters:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                             exclude_modules=r".*visual.*", init_lora_weights=False)
            model = get_peft_model(model, cfg, adapter_name="a0")
            for k in range(1, args.adapters):
                model.add_adapter(f"a{k}", cfg)
            model.eval()
            extra = {"adapter_names": [f"a{i % args.adapters}" for i in range(args.batch)]}

        def gen(n):
            # The tokens generate() returned are counted, not the ones asked for: a stop rule it applies on
            # its own (an EOS, max_length from generation_config.json) must not inflate the rate.
            with torch.no_grad():
                out = model.generate(input_ids=batch_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     **extra)
            return out.shape[1] - batch_ids.shape[1]

        gen(2)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        gen(1)
        sync()
        ttft, cpu_first = time.perf_counter() - t0, time.process_time() - c0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        made = gen(args.new_tokens)
        sync()
        if made < 2:
            raise SystemExit(f"generate() returned {made} new tokens of {args.new_tokens} asked for")
        wall = (time.perf_counter() - t0 - ttft) / (made - 1) / args.batch
        cpu = (time.process_time() - c0 - cpu_first) / (made - 1) / args.batch
        print(json.dumps({**report(), "wall_per_sample": wall, "cpu_per_sample": cpu, "ttft": ttft,
                          "generated": made, "load_s": load_s}))
        return

    once()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(per):
        once()
    sync()
    wall, cpu = (time.perf_counter() - t0) / per, (time.process_time() - c0) / per
    print(json.dumps({**report(), "wall_per_sample": wall, "cpu_per_sample": cpu, "load_s": load_s}))


if __name__ == "__main__":
    main()
