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

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

/// How long after a room ends the trim comes, so a burst of ends shares it.
const AFTER: Duration = Duration::from_secs(1);

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
                let _ = tokio::task::spawn_blocking(trim).await;
            });
        }
        Err(_) => {
            PENDING.store(false, SeqCst);
            trim();
        }
    }
}

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
