//! Embeds the demo's pretrained base model when it has been built (`ferrotune demo --rebuild-base` writes
//! assets/demo-base/model.safetensors); without it the crate still builds and the demo explains how to make it.

fn main() {
    let weights = std::path::Path::new("assets/demo-base/model.safetensors");
    println!("cargo:rerun-if-changed=assets/demo-base");
    println!("cargo::rustc-check-cfg=cfg(demo_base)");
    if weights.exists() {
        println!("cargo:rustc-cfg=demo_base");
    }
}
