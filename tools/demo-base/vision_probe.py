"""Why the demo base's recipe trains its vision tower directly (stage 0): the same tower, trained several ways.

Uses the reference stack of tools/golden (run tools/golden/setup.sh once). Needs a demo folder written by
`ferrotune demo --out DIR --lang en` (DIR/base: the embedded base; DIR/data: the robot pictures). Add more
pictures with `--train-rows`.

  direct  the demo's vision config from random init, trained with a classifier on the merged tokens
          (attention pooling, one query per attribute): held-out head / arms / locomotion / colour accuracy.
          --save FILE keeps the trained tower.
  lm      the whole model from random init, one-word answers ("dome", "2", "wheels") through the language
          model; teacher-forced held-out accuracy. --tower FILE starts the tower from a `direct` run,
          --freeze-tower keeps it fixed, --tower-lr-scale scales its learning rate, --batch sets the batch.
  readout the tower of a checkpoint (--checkpoint DIR, e.g. the recipe's work/vision; or a random one),
          frozen, with a fresh readout trained on the robots: attention pooling (--readout pool) or an MLP
          over all merged tokens (--readout mlp). How much of each robot part its features carry.

Measured on 2 CPU cores (numbers are printed every 100 steps; 400 held-out pictures): `direct` from 500
pictures reaches 95 / 98 / 100 / 100% in 1000 steps (about 2 minutes); `lm` stays at chance; `lm --tower T
--freeze-tower` reads T's features in about 200 steps; `lm --tower T` at batch 8 scrambles them, at batch 32
keeps them.
"""

import argparse
import json
import random
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, Qwen3_5ForConditionalGeneration
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

ATTRS = {
    "head": ["round", "square", "triangular", "dome"],
    "arms": [0, 1, 2, 4],
    "locomotion": ["four_legs", "tracks", "two_legs", "wheels"],
    "colour": ["black", "blue", "green", "orange", "purple", "red", "white", "yellow"],
}
QUESTIONS = {
    "head": "What shape is the robot's head?",
    "arms": "How many arms does the robot have?",
    "locomotion": "How does the robot move?",
}


def rows(demo, name, n):
    data = json.load(open(f"{demo}/data/{name}.json"))
    return data[:n] if n else data


def patches(path, p, merge):
    """Pixel values in the processor's order: merge blocks of patches, each patch (channel, time, row, col)."""
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = (torch.from_numpy(img).permute(2, 0, 1) - 0.5) / 0.5
    h, w = x.shape[1] // p, x.shape[2] // p
    t = x.reshape(3, h // merge, merge, p, w // merge, merge, p).permute(1, 4, 2, 5, 0, 3, 6)
    return t.reshape(-1, 3, 1, p, p).expand(-1, 3, 2, p, p).reshape(h * w, -1), (h, w)


class Readout(torch.nn.Module):
    """One learned query per attribute attends over the image's merged tokens, then a linear classifier."""

    def __init__(self, dim, sizes):
        super().__init__()
        self.q = torch.nn.Parameter(torch.randn(len(sizes), dim) * 0.02)
        self.k, self.v = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        self.out = torch.nn.ModuleList([torch.nn.Linear(dim, n) for n in sizes])

    def forward(self, h):
        a = torch.softmax(torch.einsum("qd,btd->bqt", self.q, self.k(h)) / h.shape[-1] ** 0.5, -1)
        z = torch.einsum("bqt,btd->bqd", a, self.v(h))
        return [o(z[:, i]) for i, o in enumerate(self.out)]


def cosine(opt, steps, warmup):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )


def direct(args):
    vcfg = AutoConfig.from_pretrained(f"{args.demo}/base").vision_config
    p, merge = vcfg.patch_size, vcfg.spatial_merge_size

    def load(rs):
        xs = [patches(f"{args.demo}/data/{r['images'][0]}", p, merge) for r in rs]
        ys = [[ATTRS[k].index(r["attributes"][k]) for k in ATTRS] for r in rs]
        return torch.stack([x for x, _ in xs]), torch.tensor(ys), xs[0][1]

    x_tr, y_tr, (h, w) = load(rows(args.demo, "mllm_robot", args.train_rows))
    x_ev, y_ev, _ = load(rows(args.demo, "mllm_robot_eval", 0))
    tower = Qwen3_5VisionModel._from_config(vcfg)
    head = Readout(vcfg.out_hidden_size, [len(v) for v in ATTRS.values()])
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = cosine(opt, args.steps, 50)

    def logits(x):
        grid = torch.tensor([[1, h, w]]).repeat(len(x), 1)
        return head(tower(x.reshape(-1, x.shape[-1]), grid_thw=grid).pooler_output.reshape(len(x), -1, head.q.shape[1]))

    t0 = time.time()
    for step in range(args.steps):
        i = torch.randint(0, len(x_tr), (args.batch,))
        loss = sum(torch.nn.functional.cross_entropy(o, y_tr[i, j]) for j, o in enumerate(logits(x_tr[i])))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():
                outs = [logits(x_ev[k : k + 50]) for k in range(0, len(x_ev), 50)]
            acc = {
                a: round(100 * torch.cat([o[j] for o in outs]).argmax(-1).eq(y_ev[:, j]).float().mean().item())
                for j, a in enumerate(ATTRS)
            }
            print(f"step {step} loss {loss.item():.3f} held-out {acc} {time.time() - t0:.0f}s", flush=True)
    if args.save:
        torch.save(tower.state_dict(), args.save)


def readout(args):
    vcfg = AutoConfig.from_pretrained(f"{args.demo}/base").vision_config
    p, merge = vcfg.patch_size, vcfg.spatial_merge_size
    tower = Qwen3_5VisionModel._from_config(vcfg)
    if args.checkpoint:
        weights = load_file(f"{args.checkpoint}/model.safetensors")
        prefix = "model.visual."
        print(tower.load_state_dict({k[len(prefix) :]: v.float() for k, v in weights.items() if k.startswith(prefix)}))
    tower.eval()

    def load(rs):
        xs = [patches(f"{args.demo}/data/{r['images'][0]}", p, merge) for r in rs]
        ys = torch.tensor([[ATTRS[k].index(r["attributes"][k]) for k in ATTRS] for r in rs])
        h, w = xs[0][1]
        with torch.no_grad():
            feats = [
                tower(x.reshape(-1, x.shape[-1]), grid_thw=torch.tensor([[1, h, w]])).pooler_output
                for x, _ in xs
            ]
        return torch.stack(feats), ys

    f_tr, y_tr = load(rows(args.demo, "mllm_robot", args.train_rows))
    f_ev, y_ev = load(rows(args.demo, "mllm_robot_eval", 0))
    sizes = [len(v) for v in ATTRS.values()]
    dim = f_tr.shape[-1]
    if args.readout == "pool":
        head = Readout(dim, sizes)
    else:
        head = Mlp(dim, f_tr.shape[1], sizes)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01)
    for step in range(args.steps):
        i = torch.randint(0, len(f_tr), (args.batch,))
        loss = sum(torch.nn.functional.cross_entropy(o, y_tr[i, j]) for j, o in enumerate(head(f_tr[i])))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == args.steps - 1:
            with torch.no_grad():
                outs = head(f_ev)
            acc = {a: round(100 * outs[j].argmax(-1).eq(y_ev[:, j]).float().mean().item()) for j, a in enumerate(ATTRS)}
            print(f"step {step} loss {loss.item():.3f} held-out {acc}", flush=True)


class Mlp(torch.nn.Module):
    """All merged tokens, each normalised, flattened, through one hidden layer of 256."""

    def __init__(self, dim, tokens, sizes):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.hidden = torch.nn.Linear(tokens * dim, 256)
        self.out = torch.nn.ModuleList([torch.nn.Linear(256, n) for n in sizes])

    def forward(self, h):
        z = torch.nn.functional.gelu(self.hidden(self.norm(h).flatten(1)))
        return [o(z) for o in self.out]


def lm(args):
    cfg = AutoConfig.from_pretrained(f"{args.demo}/base")
    model = Qwen3_5ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(f"{args.demo}/base")
    tower = model.model.visual
    if args.tower:
        tower.load_state_dict(torch.load(args.tower))
    tower_params = list(tower.parameters())
    if args.freeze_tower:
        for q in tower_params:
            q.requires_grad_(False)

    def build(rs):
        out = []
        for r in rs:
            img = Image.open(f"{args.demo}/data/{r['images'][0]}").convert("RGB")
            for attr, question in QUESTIONS.items():
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
                x = proc(text=[prompt + str(r["attributes"][attr]) + "<|im_end|>\n"], images=[img], return_tensors="pt")
                n = proc(text=[prompt], images=[img], return_tensors="pt")["input_ids"].shape[1]
                labels = x["input_ids"].clone()
                labels[:, :n] = -100
                x["labels"] = labels
                out.append((attr, n, dict(x)))
        return out

    train = build(rows(args.demo, "mllm_robot", args.train_rows))
    held_out = build(rows(args.demo, "mllm_robot_eval", 150))
    ids = {id(q) for q in tower_params}
    groups = [{"params": [q for q in model.parameters() if id(q) not in ids], "lr": args.lr}]
    if not args.freeze_tower:
        groups.append({"params": tower_params, "lr": args.lr * args.tower_lr_scale})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = cosine(opt, args.steps, 30)

    def accuracy():
        model.eval()
        hits = {a: [0, 0] for a in QUESTIONS}
        with torch.no_grad():
            for attr, n, x in held_out:
                logits = model(**x, use_cache=False).logits[0]
                answer = x["input_ids"][0, n:-2]
                hits[attr][0] += bool(logits[n - 1 : -3].argmax(-1).eq(answer).all())
                hits[attr][1] += 1
        model.train()
        return {a: round(100 * h / t) for a, (h, t) in hits.items()}

    t0 = time.time()
    for step in range(args.steps):
        opt.zero_grad()
        total = 0.0
        for _, _, x in random.sample(train, args.batch):
            loss = model(**x, use_cache=False).loss / args.batch
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {total:.3f} held-out {accuracy()} {time.time() - t0:.0f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["direct", "lm", "readout"])
    ap.add_argument("--demo", required=True, help="folder written by `ferrotune demo --out DIR --lang en`")
    ap.add_argument("--train-rows", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--save", help="direct: write the trained tower here")
    ap.add_argument("--tower", help="lm: start the tower from this `direct --save` file")
    ap.add_argument("--freeze-tower", action="store_true")
    ap.add_argument("--tower-lr-scale", type=float, default=1.0)
    ap.add_argument("--checkpoint", help="readout: the checkpoint whose tower is read (default: a random tower)")
    ap.add_argument("--readout", choices=["pool", "mlp"], default="pool")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(args.threads)
    {"direct": direct, "lm": lm, "readout": readout}[args.mode](args)


if __name__ == "__main__":
    main()
