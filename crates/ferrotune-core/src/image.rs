//! Qwen2-VL-family image processor (smart_resize, bicubic resize, normalise, patchify).
