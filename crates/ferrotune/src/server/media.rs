//! Where an `image_url` may come from: data URLs always; local files only under `--media-dir` (after resolving
//! symlinks and `..`); http(s) only with `--allow-remote-images`, and then never from loopback, private,
//! link-local or other non-public addresses (checked on the addresses actually connected to, redirects included).

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use image::RgbImage;

use super::error::ApiError;

#[derive(Clone, Debug, Default)]
pub struct MediaPolicy {
    /// Canonical folder local paths must resolve into; `None` refuses local paths.
    pub media_dir: Option<PathBuf>,
    pub allow_remote: bool,
    /// Largest image file or download, in bytes.
    pub max_bytes: u64,
    /// `image_min_pixels` / `image_max_pixels` of the pre-resize (see [`ferrotune_core::image::fit_pixels`]).
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// Largest image accepted for decoding, in pixels (width × height), checked from the header first.
    pub max_decode_pixels: u64,
}

/// Default of [`MediaPolicy::max_decode_pixels`]: 64 megapixels (an 8K × 8K picture).
pub const DEFAULT_MAX_DECODE_PIXELS: u64 = 64 << 20;

/// Resolves one `image_url.url` to an RGB image. `param` names it in errors.
pub fn load(url: &str, policy: &MediaPolicy, param: &str) -> Result<RgbImage, ApiError> {
    let bytes = if let Some(rest) = strip_prefix_ci(url, "data:") {
        data_url(rest, param)?
    } else if strip_prefix_ci(url, "http://").is_some() || strip_prefix_ci(url, "https://").is_some() {
        if !policy.allow_remote {
            return Err(ApiError::bad(
                "image URLs are not fetched by this server; send the image as a data URL \
                 (data:image/png;base64,...), or start it with --allow-remote-images",
            )
            .param(param)
            .code("remote_images_disabled"));
        }
        fetch(url, policy.max_bytes, param)?
    } else if let Some(rest) = strip_prefix_ci(url, "file://") {
        let path = percent_decode(rest).map_err(|m| ApiError::bad(m).param(param))?;
        local_file(Path::new(&path), policy, param)?
    } else if has_scheme(url) {
        return Err(ApiError::bad(format!(
            "unsupported image URL scheme in {:?}; use a data URL, a local path under the media folder, or http(s)",
            truncate(url, 40)
        ))
        .param(param));
    } else {
        local_file(Path::new(url), policy, param)?
    };
    let limit = policy.max_decode_pixels;
    if let Some((w, h)) = ferrotune_core::image::image_dimensions(&bytes) {
        if w as u64 * h as u64 > limit {
            return Err(ApiError::bad(format!(
                "the image is {w}×{h} = {} pixels, more than this server decodes ({limit}, set by \
                 --max-image-pixels); send a smaller image",
                w as u64 * h as u64
            ))
            .param(param)
            .code("image_too_large"));
        }
    }
    let img = ferrotune_core::image::decode_image_within(&bytes, param, limit)
        .map_err(|e| ApiError::bad(format!("{e:#}")).param(param).code("invalid_image"))?;
    Ok(ferrotune_core::image::fit_pixels(img, policy.min_pixels, policy.max_pixels))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.is_char_boundary(prefix.len()) && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

/// `scheme:` per RFC 3986 (letters, then letters, digits, `+-.`), but not a Windows drive letter.
fn has_scheme(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, _)) => {
            scheme.len() > 1
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

/// `data:[<mediatype>][;base64],<data>`: only base64 image payloads.
fn data_url(rest: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(ApiError::bad("malformed data URL: no ',' before the data").param(param).code("invalid_image_url"));
    };
    let mut fields = meta.split(';');
    let mime = fields.next().unwrap_or("").trim().to_ascii_lowercase();
    if !(mime.is_empty() || mime.starts_with("image/")) {
        return Err(ApiError::bad(format!(
            "data URL of type {mime:?}: only images (image/png, image/jpeg, ...) are accepted"
        ))
        .param(param)
        .code("invalid_image_url"));
    }
    if !fields.any(|f| f.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::bad("data URL without ;base64: send the image bytes base64-encoded")
            .param(param)
            .code("invalid_image_url"));
    }
    let clean: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let lenient = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let standard = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, lenient);
    let url_safe = base64::engine::GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient);
    standard.decode(&clean).or_else(|_| url_safe.decode(&clean)).map_err(|e| {
        ApiError::bad(format!("the data URL's base64 payload does not decode: {e}")).param(param).code("invalid_image")
    })
}

/// The %-escapes of a `file://` URL decoded. A `%` without two hex digits after it is refused (the decoder would
/// keep it as is), so that a mistyped path is reported rather than looked up.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let escape_ok = |i: usize| b.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
    if (0..b.len()).any(|i| b[i] == b'%' && !escape_ok(i)) {
        return Err("malformed %-escape in file:// URL".into());
    }
    let decoded = percent_encoding::percent_decode_str(s).decode_utf8();
    decoded.map(|d| d.into_owned()).map_err(|_| "file:// URL is not UTF-8 after %-decoding".into())
}

/// `..` and `.` removed without touching the file system (for paths that do not exist).
fn lexical_normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn local_file(path: &Path, policy: &MediaPolicy, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some(root) = policy.media_dir.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "local image paths are not allowed; start the server with --media-dir DIR to serve images from DIR, \
             or send the image as a data URL",
        )
        .param(param)
        .code("local_images_disabled"));
    };
    let forbidden = || {
        ApiError::new(StatusCode::FORBIDDEN, format!("{}: outside the media folder", path.display()))
            .param(param)
            .code("path_outside_media_dir")
    };
    let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    let real = match joined.canonicalize() {
        Ok(p) => p,
        // Only say "not found" for paths that would be inside the folder: nothing about the rest of the disk leaks.
        Err(_) if lexical_normalize(&joined).starts_with(root) => {
            return Err(ApiError::bad(format!("{}: no such image in the media folder", path.display()))
                .param(param)
                .code("image_not_found"))
        }
        Err(_) => return Err(forbidden()),
    };
    if !real.starts_with(root) {
        return Err(forbidden());
    }
    let meta = std::fs::metadata(&real).map_err(|e| ApiError::bad(format!("{}: {e}", path.display())).param(param))?;
    if !meta.is_file() {
        return Err(ApiError::bad(format!("{}: not a file", path.display())).param(param));
    }
    if meta.len() > policy.max_bytes {
        return Err(ApiError::bad(format!("{}: larger than {} bytes", path.display(), policy.max_bytes)).param(param));
    }
    std::fs::read(&real).map_err(|e| ApiError::bad(format!("{}: cannot read: {e}", path.display())).param(param))
}

/// Whether an address is on the public internet (not loopback, private, link-local, CGNAT, multicast,
/// documentation, unique-local or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b)) // NAT64 can reach private IPv4
        }
    }
}

/// A resolver that refuses names resolving to any non-public address, so the check holds for the address
/// actually connected to (no second lookup an attacker's DNS could answer differently) and for every redirect.
#[derive(Debug)]
struct PublicOnly;

impl ureq::unversioned::resolver::Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let addrs = ureq::unversioned::resolver::DefaultResolver::default().resolve(uri, config, timeout)?;
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} resolves to the non-public address {}", uri.host().unwrap_or("?"), bad.ip()),
            )));
        }
        Ok(addrs)
    }
}

fn fetch(url: &str, max_bytes: u64, param: &str) -> Result<Vec<u8>, ApiError> {
    let config = ureq::Agent::config_builder()
        .proxy(None) // a proxy would connect on our behalf, past the address check
        .timeout_global(Some(Duration::from_secs(20)))
        .max_redirects(3)
        .build();
    let agent = ureq::Agent::with_parts(config, ureq::unversioned::transport::DefaultConnector::new(), PublicOnly);
    let shown = truncate(url, 80);
    let fail = |e: ureq::Error| -> ApiError {
        let refused = matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied);
        if refused {
            ApiError::new(StatusCode::FORBIDDEN, format!("{shown}: refused: {e}")).param(param).code("url_not_public")
        } else {
            ApiError::bad(format!("{shown}: cannot fetch the image: {e}")).param(param).code("image_fetch_failed")
        }
    };
    let mut resp = agent.get(url).call().map_err(fail)?;
    resp.body_mut().with_config().limit(max_bytes).read_to_vec().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn remote_fetch_never_reaches_loopback() {
        let policy = MediaPolicy {
            allow_remote: true,
            max_bytes: 1 << 20,
            max_pixels: 1 << 20,
            max_decode_pixels: 1 << 20,
            ..Default::default()
        };
        for url in ["http://127.0.0.1:9/x.png", "http://localhost:9/x.png", "http://[::1]:9/x.png"] {
            let e = load(url, &policy, "p").unwrap_err();
            assert_eq!(e.status, StatusCode::FORBIDDEN, "{url}: {}", e.message);
        }
    }

    #[test]
    fn schemes_and_data_urls() {
        let policy =
            MediaPolicy { max_bytes: 1 << 20, max_pixels: 1 << 20, max_decode_pixels: 1 << 20, ..Default::default() };
        assert!(has_scheme("ftp://x") && has_scheme("data:x") && !has_scheme("C:\\img.png") && !has_scheme("a/b.png"));
        let e = load("ftp://host/a.png", &policy, "p").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = load("data:text/plain;base64,aGk=", &policy, "p").unwrap_err();
        assert!(e.message.contains("text/plain"), "{}", e.message);
        let e = load("data:image/png;base64,@@@", &policy, "p").unwrap_err();
        assert_eq!(e.code, Some("invalid_image"));
        let e = load("data:image/png;base64,aGVsbG8=", &policy, "p").unwrap_err();
        assert!(e.message.contains("not a PNG"), "{}", e.message);
        assert_eq!(percent_decode("/a%20b").unwrap(), "/a b");
        assert!(percent_decode("/a%2").is_err() && percent_decode("/a%zz").is_err());
        assert_eq!(lexical_normalize(Path::new("/m/a/../../etc")), Path::new("/etc"));
    }
}
