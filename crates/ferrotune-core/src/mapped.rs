//! Checkpoint tensors used in place: a file mapping handed to candle as the `Vec` its CPU storage owns.
//!
//! candle's CPU tensors own a `Vec<T>`. A `Vec` whose buffer lies inside a private file mapping lets a checkpoint
//! run with no copy and no anonymous memory: loading costs no page faults on fresh memory and no memcpy, the pages
//! are the page cache's (shared with other processes, dropped and re-read by the kernel under pressure), and a
//! write (an optimizer updating a tensor in place) copies one page privately instead of touching the file.
//!
//! Such a buffer must never reach malloc, so the process allocator is wrapped ([`Allocator`], installed in
//! `lib.rs`): freeing a pointer inside a registered mapping releases its whole pages (`MADV_DONTNEED`) and, once the
//! last buffer and the mapping's owner ([`Mapping`]) are gone, unmaps it. Every other pointer goes to the system
//! allocator after a scan of the registered ranges (none while nothing is mapped).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Mappings alive at once; a checkpoint has one per shard (Qwen3.5-397B: 94), more fall back to copying.
const SLOTS: usize = 256;

struct Region {
    /// First byte of the mapping; 0 while the slot is free. Written last when claiming, first when clearing.
    start: AtomicUsize,
    end: AtomicUsize,
    /// Buffers handed out plus one for the owner.
    live: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Region = Region { start: AtomicUsize::new(0), end: AtomicUsize::new(0), live: AtomicUsize::new(0) };
static REGIONS: [Region; SLOTS] = [FREE; SLOTS];
/// Slots ever claimed (the scan's bound).
static CLAIMED: AtomicUsize = AtomicUsize::new(0);
static CLAIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn find(p: *mut u8) -> Option<usize> {
    let n = CLAIMED.load(Ordering::Acquire);
    let p = p as usize;
    (0..n).find(|&i| {
        let s = REGIONS[i].start.load(Ordering::Acquire);
        s != 0 && p >= s && p < REGIONS[i].end.load(Ordering::Acquire)
    })
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Drops the pages lying wholly inside `[p, p + len)` from this process (they read back from the file if touched).
fn release_pages(p: usize, len: usize) {
    let pg = page();
    let (a, b) = (p.div_ceil(pg) * pg, (p + len) / pg * pg);
    if b > a {
        // SAFETY: the range lies inside a live private mapping of ours and no buffer uses it any more.
        unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED) };
    }
}

/// One reference to slot `i` is gone; the last unmaps it.
fn unref(i: usize) {
    let r = &REGIONS[i];
    if r.live.fetch_sub(1, Ordering::AcqRel) == 1 {
        let (s, e) = (r.start.load(Ordering::Acquire), r.end.load(Ordering::Acquire));
        r.start.store(0, Ordering::Release);
        r.end.store(0, Ordering::Release);
        // SAFETY: nothing refers into the mapping any more (no buffers, no owner).
        unsafe { libc::munmap(s as *mut libc::c_void, e - s) };
    }
}

/// The system allocator, except that buffers inside a [`Mapping`] are released to the mapping.
pub struct Allocator;

// SAFETY: every call is forwarded to `System` except for pointers inside a registered mapping, which were never
// allocated by it: those are only ever released (never reused, never handed to `System`).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match find(ptr) {
            Some(i) => {
                release_pages(ptr as usize, layout.size());
                unref(i);
            }
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match find(ptr) {
            Some(i) => {
                let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    release_pages(ptr as usize, layout.size());
                    unref(i);
                }
                new
            }
            None => System.realloc(ptr, layout, new_size),
        }
    }
}

/// A private, copy-on-write mapping of a whole file whose ranges can be handed out as owned `Vec`s.
pub struct Mapping {
    slot: usize,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is only read through `bytes` and the buffers handed out own disjoint ranges.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `file` (None when it is empty, the platform has no such mappings or every slot is taken: the caller
    /// then reads the file another way).
    pub fn open(file: &std::fs::File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        let _claim = CLAIM.lock().ok()?;
        let n = CLAIMED.load(Ordering::Acquire);
        let slot = (0..n).find(|&i| REGIONS[i].start.load(Ordering::Acquire) == 0).or((n < SLOTS).then_some(n))?;
        // SAFETY: a fresh private mapping of a file we opened; writes stay in this process.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let r = &REGIONS[slot];
        r.live.store(1, Ordering::Release);
        r.end.store(ptr as usize + len, Ordering::Release);
        r.start.store(ptr as usize, Ordering::Release);
        if slot == n {
            CLAIMED.store(n + 1, Ordering::Release);
        }
        Some(Self { slot, ptr: ptr as *mut u8, len })
    }

    /// The file's bytes as mapped (those of buffers handed out may since have been changed by their owner).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Drops the pages lying wholly inside `len` bytes at `offset` from this process, for a range that no buffer
    /// owns (read once and copied, e.g.).
    pub fn release(&self, offset: usize, len: usize) {
        if offset.saturating_add(len) <= self.len {
            release_pages(self.ptr as usize + offset, len);
        }
    }

    /// `n` elements of `T` starting at byte `offset`, owned in place: no copy. None when the range is empty,
    /// misaligned for `T` or past the end.
    ///
    /// # Safety
    /// No other buffer handed out by this mapping may overlap the range, and `T` must be valid for any bit
    /// pattern (plain numbers).
    pub unsafe fn vec<T: Copy>(&self, offset: usize, n: usize) -> Option<Vec<T>> {
        let bytes = n.checked_mul(std::mem::size_of::<T>())?;
        if n == 0 || offset.checked_add(bytes)? > self.len {
            return None;
        }
        let p = self.ptr.add(offset);
        if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        // Start reading the range from disk now if it is not cached (a no-op when it is).
        let pg = page();
        let a = p as usize / pg * pg;
        libc::madvise(a as *mut libc::c_void, p as usize + bytes - a, libc::MADV_WILLNEED);
        REGIONS[self.slot].live.fetch_add(1, Ordering::AcqRel);
        Some(Vec::from_raw_parts(p as *mut T, n, n))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unref(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Resident KiB of this process's mapping that starts at `start` (from /proc/self/smaps).
    fn mapped_rss_kib(start: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{start:x}-");
        let at = smaps.lines().position(|l| l.starts_with(&head)).expect("the mapping is listed");
        let rss = smaps.lines().skip(at).find(|l| l.starts_with("Rss:")).unwrap();
        rss.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn buffers_read_the_file_write_privately_and_unmap_after_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let pg = page();
        let floats: Vec<f32> = (0..(4 * pg) as u32).map(|i| i as f32 * 0.5).collect();
        let raw: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
        std::fs::File::create(&path).unwrap().write_all(&raw).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = Mapping::open(&file).expect("a private mapping");
        assert_eq!(map.bytes(), &raw[..]);
        // SAFETY: disjoint ranges of plain floats.
        let (mut a, b) = unsafe { (map.vec::<f32>(0, pg).unwrap(), map.vec::<f32>(4 * pg, 2 * pg).unwrap()) };
        assert!(unsafe { map.vec::<f32>(2, 4) }.is_none(), "a misaligned range is refused");
        assert!(unsafe { map.vec::<f32>(4 * pg, 4 * pg) }.is_none(), "a range past the end is refused");
        assert_eq!(&a[..], &floats[..pg]);
        assert_eq!(&b[..], &floats[pg..3 * pg]);
        let start = map.ptr as usize;
        assert!(find(a.as_mut_ptr() as *mut u8).is_some());
        // A write stays in this process: the file is unchanged.
        a[0] = -1.0;
        assert_eq!(map.bytes()[..4], (-1.0f32).to_le_bytes());
        assert_eq!(std::fs::read(&path).unwrap(), raw);
        // Growing a mapped buffer moves it to the heap with its contents.
        let mut grown = a.clone();
        a.push(7.0);
        grown.push(7.0);
        assert_eq!(a, grown);
        assert!(find(a.as_mut_ptr() as *mut u8).is_none());
        // Dropping a buffer drops its whole pages from this process; the last reference unmaps.
        let before = mapped_rss_kib(start);
        drop(b);
        let after = mapped_rss_kib(start);
        assert!(after + 8 * pg / 1024 <= before, "a freed buffer's pages stay resident: {before} -> {after} KiB");
        drop(map);
        assert!(find(start as *mut u8).is_none());
    }
}
