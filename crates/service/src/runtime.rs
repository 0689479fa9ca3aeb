//! Starting a service's process: the allocator first, then the Tokio runtime.

use std::future::Future;
use std::process::ExitCode;

use crate::EXIT_FAILURE;

/// Caps glibc malloc's arenas (see [`limit_malloc_arenas`]), then runs `main` to completion on a
/// multi-threaded Tokio runtime, which `#[tokio::main]` would have started before any of that.
pub fn run<F: Future<Output = ExitCode>>(service: &'static str, main: F) -> ExitCode {
    limit_malloc_arenas();
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

/// Caps glibc malloc at two arenas, unless `MALLOC_ARENA_MAX` is set.
///
/// Why: glibc gives threads that contend for the allocator arenas of their own, up to eight per
/// core. A service's Tokio workers and blocking threads then free memory into several arenas,
/// each keeping it for its own reuse, so the resident set grows with how long and how busy the
/// service has been rather than with what it holds: after a first sync of 1M members the
/// evaluator was 51 MiB resident with the default and 46-48 MiB with two arenas, for the same heap
/// peak (about 26 MB) and the same sync time.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only sets an allocator parameter; it runs before the runtime starts
        // any thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
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
