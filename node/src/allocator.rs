//! The process's heap: glibc's allocator set for tensor work at start-up, and the memory
//! that a finished piece of work leaves free given back to the kernel.
//!
//! A training step or a serving call allocates and frees the same blocks every time, some
//! of them hundreds of MiB (a Llama's logits and their gradient, its embedding's gradient,
//! the all-reduce's buckets). Left to glibc, a block above the mmap threshold (at most
//! 32 MiB) is a fresh `mmap` each time, and free memory at the heap's top beyond the trim
//! threshold goes back to the kernel: either way the next step faults and zeroes those pages
//! again. With one arena, every block from the heap and no automatic trimming, a step reuses
//! the memory of the step before. Measured on the ~150 M Llama (sequence 256, batch 4,
//! 1 thread): 100-240 k page faults per 5 s of training with the 32 MiB threshold and a
//! 1 GiB trim threshold, 0-2 k with these settings (the docs' issue 19 section has the
//! paired step times).
//!
//! The price is that a node keeps the memory of its largest step. So the work that ends
//! gives it back ([`give_back`]): a training job when it ends, a stage when it loaded or
//! dropped layers (the read buffers of the load).

/// Sets glibc's allocator for tensor work; call first thing in `main`, before any thread
/// exists (libtorch's and the runtime's threads share its one arena):
/// - `M_ARENA_MAX` 1: one arena, the main (`brk`) one. A thread's own arena gives whole
///   64 MiB heaps back to the kernel when they empty, which re-faults them on the next step.
/// - `M_MMAP_MAX` 0: no block is its own `mmap`, however large: every block comes from the
///   heap and its pages stay mapped when it is freed.
/// - `M_TRIM_THRESHOLD` never: the heap's free top is not handed back on `free`; only
///   [`give_back`] hands back free pages (anywhere in the heap).
///
/// Elsewhere than Linux with glibc it does nothing.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    // glibc reads M_TRIM_THRESHOLD as a size_t: -1 is the largest, so never.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Hands the heap's free pages back to the kernel (`malloc_trim(0)`: free pages anywhere in
/// the heap, not only at its top); true when some were. Costs a walk over the free blocks
/// (milliseconds for a heap of GiB) and the pages' faults when they are used again: call it
/// when a piece of work ends, not per step. Elsewhere than Linux with glibc it does nothing.
pub fn give_back() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists under its lock.
    unsafe {
        libc::malloc_trim(0) != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;
    use crate::status::ProcessMemory;

    /// Set in the child process [`tuned_heap_keeps_freed_memory_until_given_back`] starts.
    const CHILD: &str = "SHOAL_ALLOCATOR_TEST_CHILD";

    /// `tune` and `give_back` change the whole process, and other tests allocate in
    /// parallel: the check runs alone, in a child process of this test binary. `tune`
    /// comes first in `main`, before any thread has an arena of its own; the test harness
    /// starts threads before any test, so the child gets its one arena from glibc's
    /// tunable at start-up instead (the rest from `tune`).
    #[test]
    fn tuned_heap_keeps_freed_memory_until_given_back() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "allocator::tests::child", "--test-threads", "1"])
            .env(CHILD, "1")
            .env("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "the child ran no check: {text}");
    }

    /// The child's half (does nothing unless started by the test above): a 256 MiB block
    /// stays resident when freed, and leaves when given back.
    #[test]
    fn child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        const MB: u64 = 1 << 20;
        tune();
        let rss = || ProcessMemory::now().expect("linux").rss_bytes;
        let before = rss();
        let block = vec![1u8; 256 * MB as usize];
        std::hint::black_box(&block);
        let held = rss();
        assert!(
            held >= before + 250 * MB,
            "the block is resident: {before} -> {held}"
        );
        drop(block);
        let freed = rss();
        assert!(freed + 8 * MB >= held, "freed and kept: {held} -> {freed}");
        assert!(give_back());
        let after = rss();
        assert!(after + 240 * MB <= freed, "given back: {freed} -> {after}");
    }
}
