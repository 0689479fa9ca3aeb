//! Starting a service's process: the allocator first, then the Tokio runtime.

use std::future::Future;
use std::process::ExitCode;

use crate::EXIT_FAILURE;

/// Sets glibc malloc up for a long-running service (see [`tune_malloc`]), then runs `main` to
/// completion on a multi-threaded Tokio runtime, which `#[tokio::main]` would have started
/// before any of that.
pub fn run<F: Future<Output = ExitCode>>(service: &'static str, main: F) -> ExitCode {
    tune_malloc();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(main),
        Err(error) => {
            eprintln!("{service}: cannot start the async runtime: {error}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Most bytes of an allocation served from malloc's heap rather than by a mapping of its own.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Caps glibc malloc at two arenas, unless `MALLOC_ARENA_MAX` is set, and fixes the size above
/// which it maps an allocation of its own at 128 KiB, unless `MALLOC_MMAP_THRESHOLD_` is set.
///
/// Why the arenas: glibc gives threads that contend for the allocator arenas of their own, up
/// to eight per core. A service's Tokio workers and blocking threads then free memory into
/// several arenas, each keeping it for its own reuse, so the resident set grows with how long
/// and how busy the service has been rather than with what it holds: after a first sync of 1M
/// members the evaluator was 51 MiB resident with the default and 46-48 MiB with two arenas,
/// for the same heap peak (about 26 MB) and the same sync time.
///
/// Why the threshold: 128 KiB is glibc's starting value, but by default it rises to the size
/// of every mapped block freed (up to 32 MiB), after which such blocks come from the heap.
/// The services' large buffers (a batch's rows, a Bulk job's CSV, grown socket buffers) then
/// stay resident in the heap's free space, fragmented, after they are freed; mapped, they go
/// back to the system at once. Measured over quick runs of the 1M benchmark: the evaluator's
/// peak went from 45.4-47.8 to 42.6-44.6 MiB (the writer's barely moved, 26.2-26.6 to
/// 26.1-26.3 MiB), with no visible cost in the sync times.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: `mallopt` only sets an allocator parameter; it runs before the runtime
            // starts any thread.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
        }
    }
}

/// Gives the allocator's free memory back to the system (glibc's `malloc_trim`), after a burst
/// of work whose buffers are gone.
///
/// Why: glibc returns only the free memory at the top of a heap by itself; what a burst frees
/// in the middle stays resident until reused.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
