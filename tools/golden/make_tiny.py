"""Builds the tiny random-init Qwen3.5 checkpoint that the Rust tests load.

The architecture is the real `qwen3_5` one (vision tower + merger + hybrid Gated-DeltaNet / gated-attention
decoder, layer mix 3:1), only narrower. The tokenizer is a small byte-level BPE trained here with the Qwen3.5
pre-tokenizer, normaliser and special tokens; the chat template is the model family's own.

Output: tests/fixtures/tiny-qwen3_5/ (bf16 weights, A_log in f32 as some exports have it, two shards + index,
one `mtp.*` tensor that loaders must ignore).

Run: tools/golden/.venv/bin/python tools/golden/make_tiny.py
"""

import json
import os
import random
import shutil
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")

# Same regex as transformers' Qwen3_5Tokenizer.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3.5's added tokens, in the order of the real vocabulary (248044..248069). `special` follows the real
# tokenizer: the think/tool markers are plain added tokens (kept when decoding).
ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
BPE_VOCAB = 2000
VOCAB_SIZE = 2048  # padded, as the real checkpoint pads 248077 tokens to 248320


def corpus():
    """Text the BPE is trained on: the words of the demo's captions and robot descriptions (Chinese and English)
    and some plain prose, so that both languages tokenize into a reasonable number of pieces."""
    sys.path.insert(0, HERE)
    from corpus_words import sentences

    rng = random.Random(0)
    return sentences(rng, 6000)


def build_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Tokens of at most 9 byte-level symbols (three CJK characters): without the cap this small, repetitive corpus
    # would merge whole Chinese phrases into single tokens.
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False, max_token_length=9,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() <= BPE_VOCAB, tok.get_vocab_size()
    # Pad the BPE part to exactly BPE_VOCAB ids so that the added tokens land at fixed ids.
    from tokenizers import AddedToken
    base = tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(BPE_VOCAB - base)])
    ids = {}
    for content, special in ADDED:
        at = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
        ids[content] = tok.token_to_id(content)
    assert ids["<|endoftext|>"] == BPE_VOCAB, ids
    return tok, ids


def main():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tok, ids = build_tokenizer()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(HERE, "qwen3_5_chat_template.jinja")) as f:
        chat_template = f.read()
    with open(os.path.join(OUT, "chat_template.jinja"), "w") as f:
        f.write(chat_template)
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    }
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)

    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        # Smaller than the real 65536..16777216 so test sequences stay short: 64x64 .. 256x256 pixels.
        "size": {"shortest_edge": 4096, "longest_edge": 65536},
    }
    with open(os.path.join(OUT, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    video_preprocessor = dict(preprocessor, video_processor_type="Qwen3VLVideoProcessor", fps=2,
                              size={"shortest_edge": 4096, "longest_edge": 65536})
    video_preprocessor.pop("image_processor_type")
    with open(os.path.join(OUT, "video_preprocessor_config.json"), "w") as f:
        json.dump(video_preprocessor, f, indent=2)

    text_config = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [3, 3, 2], "mrope_interleaved": True},
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "initializer_range": 0.08,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 64,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 128,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 576,
        "initializer_range": 0.08,
    }
    config = Qwen3_5Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]

    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(config).to(torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random norm weights, so that a (1+w) / w mix-up or a skipped norm shows in the logits.
            text_norm = "visual" not in name and name.endswith("norm.weight")
            if text_norm and "linear_attn.norm" in name:  # plain weight, initialised at one
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif text_norm:  # (1+w) weights, initialised at zero
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "visual" in name and "norm" in name:  # LayerNorms
                if name.endswith(".weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.linspace(-1.0, 1.0, p.numel()))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.linspace(0.5, 8.0, p.numel())))
            elif name.endswith("pos_embed.weight") or name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    # Store bf16 like real checkpoints (A_log stays f32, as in some exports); round the live model the same way
    # so that what is saved is exactly what the reference scripts compute with after upcasting to f32.
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("A_log"):
            state[name] = p.detach().clone().to(torch.float32)
        else:
            state[name] = p.detach().clone().to(torch.bfloat16)
    state["mtp.fc.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)  # ignored by loaders, as in real files
    tied = "lm_head.weight"
    state.pop(tied, None)
    write_shards(state, OUT)
    config.dtype = "bfloat16"
    config.save_pretrained(OUT)
    generation = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 20,
    }
    with open(os.path.join(OUT, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    check_roundtrip()
    print("wrote", OUT, "ids", {k: v for k, v in ids.items() if "vision" in k or "im_" in k or "think" in k})


def write_shards(state, out):
    """Two shards + index, split after the text tensors, so loaders must read the index."""
    from safetensors.torch import save_file

    names = sorted(state)
    first = [n for n in names if not n.startswith("model.visual.")]
    second = [n for n in names if n.startswith("model.visual.")]
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map = {}
    total = 0
    for fname, keys in files.items():
        save_file({k: state[k].contiguous() for k in keys}, os.path.join(out, fname), metadata={"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def check_roundtrip():
    """transformers must load the directory as it is, without missing or unexpected keys."""
    from transformers import AutoProcessor, Qwen3_5ForConditionalGeneration

    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(OUT, dtype=torch.float32,
                                                                  output_loading_info=True)
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
    assert not missing and not info["mismatched_keys"], info
    AutoProcessor.from_pretrained(OUT)


if __name__ == "__main__":
    main()
