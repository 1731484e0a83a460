"""Writes the image-processor fixtures: small synthetic images and transformers' outputs for them.

Output:
  tests/fixtures/images/*                     test images (PNG, JPEG, WebP, GIF, BMP; RGB, RGBA, LA, L, 16-bit,
                                              palette with transparency), varied sizes and aspect ratios
  tests/fixtures/golden/images/processor.json       per image: size, PIL decode fingerprint, grid_thw, tokens
  tests/fixtures/golden/images/processor.safetensors  the uint8 samples behind pixel_values (see below), and the
                                              PIL-decoded pixels of the JPEG (decoders differ there)
  tests/fixtures/golden/images/resize.safetensors   torchvision and PIL bicubic resizes of a formula image
  tests/fixtures/golden/images/smart_resize.json    smart_resize cases (tiny, Qwen3.5 and Qwen2-VL settings)

pixel_values are stored exactly and compactly: with mean = std = 0.5 every value is (k - 127.5) / 127.5 in f32 for
a uint8 k, and a still image repeats the same frame over the temporal patch, so we assert both and store k for
frame 0 only, as `<name>` with shape [rows, 3, patch*patch].

Run: tools/golden/.venv/bin/python tools/golden/gen_images.py   (versions: tools/golden/requirements.txt)
"""

import io
import json
import math
import os
import random
import struct
import zlib

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image
from safetensors.numpy import save_file
from torchvision.transforms.v2 import functional as tvF
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CKPT = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen3_5")
IMAGES = os.path.join(ROOT, "tests", "fixtures", "images")
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden", "images")

VERSIONS = {"transformers": "5.5.4", "torch": "2.11.0", "torchvision": "0.26.0", "PIL": "11.3.0"}


def check_versions():
    have = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
            "torchvision": torchvision.__version__.split("+")[0], "PIL": PIL.__version__}
    if have != VERSIONS:
        raise SystemExit(f"pinned versions {VERSIONS}, found {have}: run tools/golden/setup.sh")


def scene(w, h, seed):
    """Smooth colour gradients, a few shapes and a light deterministic texture (compresses well)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 40 + 180 * x / max(w - 1, 1)
    g = 30 + 190 * y / max(h - 1, 1)
    b = 128 + 100 * np.sin((x + 2 * y) / (3 + seed))
    img = np.stack([r, g, b], -1)
    rng = random.Random(seed)
    for _ in range(3):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rad = rng.uniform(0.15, 0.4) * min(w, h) + 1
        colour = [rng.randint(0, 255) for _ in range(3)]
        img[(x - cx) ** 2 + (y - cy) ** 2 < rad ** 2] = colour
    x0, y0 = rng.randrange(w), rng.randrange(h)
    img[y0:y0 + max(h // 4, 1), x0:x0 + max(w // 5, 1)] = [250, 250, 20]
    img += ((x.astype(int) * 7 + y.astype(int) * 3) % 5 - 2)[..., None] * 3  # texture
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def png_bytes(w, h, bit_depth, colour_type, rows):
    """A minimal PNG writer, for 16-bit RGB that PIL cannot save."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_images():
    """Returns [(file name, what it covers)]."""
    os.makedirs(IMAGES, exist_ok=True)
    made = []

    def save(name, im, note, **kw):
        im.save(os.path.join(IMAGES, name), **kw)
        made.append((name, note))

    save("tiny_20x13.png", Image.fromarray(scene(20, 13, 1)), "tiny, below min_pixels: upscaled", optimize=True)
    rgba = np.dstack([scene(45, 31, 2), np.tile(np.linspace(0, 255, 45).astype(np.uint8), (31, 1))])
    save("rgba_45x31.png", Image.fromarray(rgba), "RGBA: alpha dropped, not composited")
    la = np.dstack([scene(37, 52, 3)[..., 1], np.full((52, 37), 90, np.uint8)])
    save("la_37x52.png", Image.fromarray(la), "grey + alpha")
    save("grey_57x40.png", Image.fromarray(scene(57, 40, 4)[..., 0]), "greyscale")
    grey16 = scene(33, 29, 5)[..., 2].astype(np.uint16) * 2  # about half above 255, where PIL clamps I;16
    save("grey16_33x29.png", Image.fromarray(grey16), "16-bit greyscale (PIL clamps to 255)")
    rgb16 = scene(26, 35, 6).astype(np.uint16) * 257 + 77
    with open(os.path.join(IMAGES, "rgb16_26x35.png"), "wb") as f:
        f.write(png_bytes(26, 35, 16, 2, [row.astype(">u2").tobytes() for row in rgb16]))
    made.append(("rgb16_26x35.png", "16-bit RGB (high byte kept)"))
    save("photo_123x77.jpg", Image.fromarray(scene(123, 77, 7)), "JPEG 4:2:0", quality=90)
    save("wide_400x40.webp", Image.fromarray(scene(400, 40, 8)), "10:1, lossy WebP", quality=80)
    alpha_webp = np.dstack([scene(48, 40, 9), np.full((40, 48), 200, np.uint8)])
    save("alpha_48x40.webp", Image.fromarray(alpha_webp), "lossless WebP with alpha", lossless=True)
    tall = Image.fromarray(scene(30, 300, 10)).quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=0)
    save("tall_30x300.gif", tall, "1:10, GIF palette with a transparent index", transparency=5)
    pal = Image.fromarray(scene(40, 24, 11)).quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=0)
    save("palette_40x24.png", pal, "palette PNG with a transparent index", transparency=3)
    save("odd_63x49.bmp", Image.fromarray(scene(63, 49, 12)), "BMP, odd size")
    save("large_400x300.png", Image.fromarray(scene(400, 300, 13)), "above max_pixels: downscaled", optimize=True)
    expect_modes = ["RGB", "RGBA", "LA", "L", "I;16", "RGB", "RGB", "RGB", "RGBA", "P", "P", "RGB", "RGB"]
    modes = [Image.open(os.path.join(IMAGES, name)).mode for name, _ in made]
    assert modes == expect_modes, modes
    return made


def fingerprint(rgb):
    """FNV-1a (64-bit) of the RGB bytes, row-major: compared against the Rust decoder."""
    h = 0xCBF29CE484222325
    for byte in rgb.tobytes():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def processor_goldens(made):
    proc = AutoProcessor.from_pretrained(CKPT).image_processor
    assert type(proc).__name__ == "Qwen2VLImageProcessor" and proc.backend == "torchvision", type(proc)
    assert list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.5] * 3
    p, tp, m = proc.patch_size, proc.temporal_patch_size, proc.merge_size
    pils = [Image.open(os.path.join(IMAGES, name)) for name, _ in made]
    for im in pils:
        im.load()
    # One call for all images, as the trainer batches them (exercises grouping by shape and reordering).
    out = proc(images=pils, return_tensors="pt")
    pv, grids = out["pixel_values"], out["image_grid_thw"].tolist()
    assert pv.dtype == torch.float32
    tensors, entries, offset = {}, [], 0
    table = (torch.arange(256, dtype=torch.float32) - 127.5) / 127.5
    for (name, note), im, grid in zip(made, pils, grids):
        rows = grid[0] * grid[1] * grid[2]
        block = pv[offset:offset + rows].reshape(rows, 3, tp, p * p)
        offset += rows
        for t in range(1, tp):
            assert torch.equal(block[:, :, t], block[:, :, 0]), name
        frame = block[:, :, 0]
        k = torch.round(frame * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
        assert torch.equal(table[k.long()], frame), f"{name}: pixel_values are not (k - 127.5) / 127.5 exactly"
        key = os.path.splitext(name)[0]
        tensors[key] = k.numpy()
        rgb = np.array(im.convert("RGB"))
        if name.endswith(".jpg"):
            tensors[key + ".decoded"] = rgb
        resized = smart_resize(im.height, im.width, p * m, proc.size["shortest_edge"], proc.size["longest_edge"])
        entries.append({
            "file": name, "note": note, "mode": im.mode, "width": im.width, "height": im.height,
            "rgb_fnv1a64": fingerprint(rgb), "resized": list(resized), "grid_thw": grid,
            "num_tokens": rows // (m * m),
        })
    assert offset == pv.shape[0]
    meta = {"checkpoint": "tests/fixtures/tiny-qwen3_5", "versions": VERSIONS, "patch_size": p,
            "temporal_patch_size": tp, "merge_size": m, "min_pixels": proc.size["shortest_edge"],
            "max_pixels": proc.size["longest_edge"], "images": entries}
    save_file(tensors, os.path.join(GOLDEN, "processor.safetensors"))
    text = json.dumps({**meta, "images": []}, indent=1)
    rows = ",\n".join("  " + json.dumps(e) for e in entries)
    with open(os.path.join(GOLDEN, "processor.json"), "w") as f:
        f.write(text.replace('"images": []', '"images": [\n' + rows + "\n ]") + "\n")
    return entries


def formula_image(h, w):
    """A sharp, deterministic test pattern, rebuilt identically by the Rust test (no file needed)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    c = np.arange(3, dtype=np.int64)
    return ((x * x * 3 + y * 7 + x * y * 13)[..., None] + c * 101) % 256


def resize_cases():
    """(source h, w) -> target (h, w) list: same size, each axis alone up and down, both, heavy downscale (where
    PyTorch's int16 precision search ends at 22 bits), mixed directions, and random small sizes (not 1x1, where
    torch 2.11's uint8 kernel trips an internal assert)."""
    rng = random.Random(7)
    return {
        (29, 47): [(29, 47), (29, 20), (29, 100), (60, 47), (10, 47), (64, 96), (13, 17), (32, 160), (5, 3), (2, 40)],
        (6, 700): [(6, 5), (3, 33), (12, 64)],
        (53, 31): [(rng.randint(2, 48), rng.randint(2, 48)) for _ in range(20)],
    }


def resize_goldens():
    tensors = {}
    for (h, w), targets in resize_cases().items():
        src = formula_image(h, w).astype(np.uint8)
        chw = torch.from_numpy(src).permute(2, 0, 1).contiguous()
        for oh, ow in targets:
            t = tvF.resize(chw, [oh, ow], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            tensors[f"torch.{h}x{w}.{oh}x{ow}"] = t.permute(1, 2, 0).contiguous().numpy()
            pil = Image.fromarray(src).resize((ow, oh), Image.Resampling.BICUBIC)
            tensors[f"pil.{h}x{w}.{oh}x{ow}"] = np.array(pil)
    save_file(tensors, os.path.join(GOLDEN, "resize.safetensors"))


def smart_resize_goldens(entries):
    settings = {"tiny": (32, 4096, 65536), "qwen3_5": (32, 65536, 16777216), "qwen2_vl": (28, 3136, 12845056)}
    sizes = [(e["height"], e["width"]) for e in entries] + [
        (768, 1024), (200, 200), (1, 1), (13, 20), (32, 32), (1, 200), (200, 1), (1, 201), (10, 2001), (2000, 10),
        # half-way roundings (x/32 = n + 0.5): Python rounds to even
        (48, 48), (80, 80), (112, 144), (1040, 1072), (80, 2000), (3088, 4048), (16, 16), (272, 336),
        (3024, 4032), (4000, 6000), (10000, 10000), (4096, 4096), (4097, 4095), (8192, 2048), (5000, 25),
        (100000, 600), (600, 100000), (720, 1280), (1080, 1920), (2160, 3840),
    ]
    rng = random.Random(0)
    for _ in range(150):
        sizes.append((rng.randint(1, 9000), rng.randint(1, 9000)))
    for _ in range(50):
        side = rng.randint(1, 120)
        sizes.append((side * 16 + rng.choice([0, 16]), rng.randint(1, 120) * 16))
    # One line per setting and case: [height, width, out_height, out_width], out null where Python raises.
    lines = []
    for name, (factor, lo, hi) in settings.items():
        cases = []
        for h, w in sizes:
            try:
                cases.append([h, w, *smart_resize(h, w, factor, lo, hi)])
            except ValueError:
                cases.append([h, w, None, None])
        head = json.dumps({"setting": name, "factor": factor, "min_pixels": lo, "max_pixels": hi})[:-1]
        lines.append(head + ', "cases": [\n' + ",\n".join("  " + json.dumps(c) for c in cases) + "\n]}")
    with open(os.path.join(GOLDEN, "smart_resize.json"), "w") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")


def main():
    check_versions()
    torch.set_num_threads(1)
    os.makedirs(GOLDEN, exist_ok=True)
    made = write_images()
    entries = processor_goldens(made)
    resize_goldens()
    smart_resize_goldens(entries)
    total = sum(os.path.getsize(os.path.join(d, f)) for d in (IMAGES, GOLDEN) for f in os.listdir(d))
    print(f"wrote {len(made)} images and goldens, {total / 1024:.0f} KiB in all")
    for e in entries:
        print(f"  {e['file']:22s} {e['mode']:5s} {e['height']}x{e['width']} -> {e['resized']} grid {e['grid_thw']}")


if __name__ == "__main__":
    main()
