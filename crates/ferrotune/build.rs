//! Embeds the demo's pretrained base model in the binary when it has been built (`ferrotune demo
//! --rebuild-base` writes ferrotune-core/assets/demo-base/model.safetensors); without it the binary still builds
//! and the demo explains how to make it. The library leaves the weights out, so its tests stay small.

fn main() {
    let weights = std::path::Path::new("../ferrotune-core/assets/demo-base/model.safetensors");
    println!("cargo:rerun-if-changed=../ferrotune-core/assets/demo-base");
    println!("cargo::rustc-check-cfg=cfg(demo_base)");
    if weights.exists() {
        println!("cargo:rustc-cfg=demo_base");
    }
}
