//! Images in the data stage: where a path points and how large the file is. LLaMA-Factory's pre-resize and the
//! image token count come from [`crate::image`], the same code the pixel path runs.

use std::path::{Path, PathBuf};

/// Where an image path from a row points: `media_dir/path` when that file exists, else the path as written
/// (LLaMA-Factory's `_find_medias`).
pub fn resolve_image(path: &str, media_dir: &Path) -> PathBuf {
    let joined = media_dir.join(path);
    if joined.is_file() {
        joined
    } else {
        PathBuf::from(path)
    }
}

/// Width and height from the image file's header (no decoding).
pub fn image_size(path: &Path) -> Result<(u32, u32), String> {
    if !path.exists() {
        return Err("not found".into());
    }
    image::image_dimensions(path).map_err(|e| format!("unreadable: {e}"))
}
