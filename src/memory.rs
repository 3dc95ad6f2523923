//! Giving memory back to the system when rooms end.
//!
//! Each room's task, channels and history are freed when the room ends, but
//! glibc's allocator keeps freed memory in its per-thread arenas: after
//! 10,000 rooms had come and gone, the process still held all the memory
//! they had used (123 MiB where it started at 5 MiB). `malloc_trim` returns
//! the free pages of every arena to the system. It walks the heap, so rooms
//! that end in a burst share one trim, made [`AFTER`] the first of them on a
//! blocking thread, never per message. Other allocators (musl's, in the
//! container image) return memory by themselves; there this does nothing.
//!
//! A trim cannot return a page that still holds a live allocation, and the
//! worst such allocations are the ones nobody uses: glibc keeps up to seven
//! freed blocks of each small size in a cache per thread, which its arena
//! counts as in use. After a burst of rooms those cached blocks are
//! scattered over the tens of megabytes the rooms had used, one to a page,
//! and kept 1.5 to 2.5 MB resident after every trim, more after each
//! burst. So before a trim each runtime worker, as it next goes idle
//! ([`on_park`]), takes the blocks out of its cache, and a short-lived
//! thread frees them into the arenas, where the trim can release their
//! pages.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// How long after a room ends the trim comes, so a burst of ends shares it.
const AFTER: Duration = Duration::from_secs(1);

/// How long a trim waits for the workers to empty their caches: a busy
/// worker does it the next time it goes idle, within microseconds.
const CACHES_EMPTIED_WITHIN: Duration = Duration::from_millis(50);

/// A trim is on its way.
static PENDING: AtomicBool = AtomicBool::new(false);

/// Asks for memory freed by an ended room to go back to the system within
/// about [`AFTER`]. Cheap to call often: calls while a trim is pending do
/// nothing.
pub fn release_freed() {
    if PENDING.swap(true, SeqCst) {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async {
                tokio::time::sleep(AFTER).await;
                // Cleared first: a room that ends during the trim asks again.
                PENDING.store(false, SeqCst);
                thread_cache::ask_to_empty();
                trim_soon();
            });
        }
        Err(_) => {
            PENDING.store(false, SeqCst);
            trim();
        }
    }
}

/// For the runtime's `on_thread_park`: a worker going idle empties its
/// allocator cache when a trim has asked for it since it last did, and
/// has the blocks freed and their pages trimmed. Costs one atomic load
/// otherwise.
///
/// A worker that was already asleep when the trim asked answers only when
/// it next wakes and goes idle again, after that trim: so each answer asks
/// for a trim of its own.
pub fn on_park() {
    if thread_cache::empty_if_asked() {
        trim_soon();
    }
}

/// A trim of its own is on its way: [`trim_soon`] was called.
static TRIM_PENDING: AtomicBool = AtomicBool::new(false);

/// Frees the blocks taken out of the workers' caches and trims, within
/// [`CACHES_EMPTIED_WITHIN`]: the workers that are busy when the trim asks
/// answer within that time, and their answers share this trim.
fn trim_soon() {
    if TRIM_PENDING.swap(true, SeqCst) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        TRIM_PENDING.store(false, SeqCst);
        return;
    };
    runtime.spawn(async {
        tokio::time::sleep(CACHES_EMPTIED_WITHIN).await;
        TRIM_PENDING.store(false, SeqCst);
        let _ = tokio::task::spawn_blocking(|| {
            thread_cache::free_emptied();
            trim();
        })
        .await;
    });
}

/// How many times a trim has asked the workers to empty their caches.
static ASKED: AtomicU64 = AtomicU64::new(0);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only works on the allocator's own free lists; it
    // may be called at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// glibc's per-thread cache of freed small blocks ("tcache").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod thread_cache {
    use super::ASKED;
    use std::cell::Cell;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Mutex;

    /// Blocks the cache keeps of each size (glibc's default `tcache_count`).
    const PER_SIZE: usize = 7;
    /// Its sizes: blocks of 32 to 1,040 bytes in steps of 16, asked for as
    /// 24 to 1,032 bytes (a block is its request plus an 8-byte header,
    /// rounded up to 16).
    const SIZES: usize = 64;

    /// Blocks taken out of the workers' caches, to be freed elsewhere.
    static TAKEN: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    thread_local! {
        /// The last request this thread answered.
        static ANSWERED: Cell<u64> = const { Cell::new(0) };
    }

    pub fn ask_to_empty() {
        ASKED.fetch_add(1, SeqCst);
    }

    /// Empties this thread's cache if a trim asked since it last did;
    /// whether it did.
    pub fn empty_if_asked() -> bool {
        let asked = ASKED.load(SeqCst);
        if ANSWERED.get() == asked {
            return false;
        }
        ANSWERED.set(asked);
        let mut blocks = take_cache();
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        taken.append(&mut blocks);
        true
    }

    /// The blocks in this thread's cache, and some from its arena: malloc
    /// answers from the cache first while it holds a block of the size
    /// asked for, so asking for as many blocks of each size as it can hold
    /// empties it. The caller frees them all with `libc::free`.
    pub(super) fn take_cache() -> Vec<usize> {
        let mut blocks = Vec::with_capacity(PER_SIZE * SIZES);
        for size in 0..SIZES {
            for _ in 0..PER_SIZE {
                // SAFETY: a plain allocation, freed by the caller.
                let block = unsafe { libc::malloc(24 + 16 * size) };
                if !block.is_null() {
                    blocks.push(block as usize);
                }
            }
        }
        blocks
    }

    /// Frees the blocks taken out of the caches on a thread of its own:
    /// freed here they would only fill this thread's cache, while a thread
    /// that ends hands its whole cache back to the arenas.
    pub fn free_emptied() {
        if TAKEN.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return;
        }
        let free_all = || {
            let blocks = std::mem::take(&mut *TAKEN.lock().unwrap_or_else(|e| e.into_inner()));
            for block in blocks {
                // SAFETY: each came from libc::malloc in `empty_if_asked`
                // and was taken out of TAKEN, so it is freed once, here.
                unsafe { libc::free(block as *mut libc::c_void) };
            }
        };
        match std::thread::Builder::new()
            .name("hubbub-free".into())
            .spawn(free_all)
        {
            Ok(thread) => {
                let _ = thread.join();
            }
            // Freed here instead, most of them into this thread's cache.
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to free allocator caches");
                free_all();
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod thread_cache {
    pub fn ask_to_empty() {
        super::ASKED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn empty_if_asked() -> bool {
        false
    }
    pub fn free_emptied() {}
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::thread_cache::take_cache;

    fn free_all(blocks: Vec<usize>) {
        for block in blocks {
            // SAFETY: each came from libc::malloc and is freed once.
            unsafe { libc::free(block as *mut libc::c_void) };
        }
    }

    /// What the trim relies on: blocks freed on a thread wait in its cache,
    /// and taking as many as it holds gets every one of them out.
    #[test]
    fn taking_the_cache_gets_the_blocks_freed_last() {
        let test = std::thread::spawn(|| {
            // Whatever the new thread's cache held, kept out until the end.
            let before = take_cache();
            let freed: Vec<usize> = (0..7)
                // SAFETY: freed just below.
                .map(|_| unsafe { libc::malloc(100) } as usize)
                .collect();
            assert!(freed.iter().all(|&b| b != 0));
            for &block in &freed {
                // SAFETY: from libc::malloc above, freed once.
                unsafe { libc::free(block as *mut libc::c_void) };
            }
            let taken = take_cache();
            let missing: Vec<_> = freed.iter().filter(|b| !taken.contains(b)).collect();
            free_all(taken);
            free_all(before);
            assert!(missing.is_empty(), "still cached: {missing:x?}");
        });
        // On a thread of its own, for a cache no other test has used.
        if let Err(panic) = test.join() {
            std::panic::resume_unwind(panic);
        }
    }
}
