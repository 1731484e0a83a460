//! FNV-1a, 64 bit: a small content hash that gives the same value on every platform and Rust version (unlike
//! `std`'s hasher), for fingerprints kept on disk and for the image fixtures, whose generator computes it too.

/// Streaming FNV-1a 64.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash as 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// FNV-1a 64 of `bytes`, as 16 hex digits.
pub fn fnv1a64_hex(bytes: &[u8]) -> String {
    let mut h = Fnv1a64::default();
    h.update(bytes);
    h.hex()
}
