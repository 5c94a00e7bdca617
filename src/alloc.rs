//! The process allocator. Candle allocates a fresh buffer for every tensor op; on the CPU the
//! learner's activations ([rows, hidden] f32, a few MiB each) are above glibc's mmap threshold, so
//! with the system allocator every op mapped, zeroed and unmapped its pages: a VRPO learner step at
//! the quickstart shape took 52 ms, 60% of it in page faults (perf). mimalloc keeps freed memory
//! for reuse; `tune` also stretches its purge delay so that memory freed by one step is still
//! there for the next (13.5 ms per step; `examples/profile_learner.rs` reproduces both numbers).
//! Also the number of threads each tensor op may use (`default_op_threads`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: index 15 in the bundled `mimalloc.h` (v2 and v3 alike),
/// right before `use_numa_nodes` = 16, which libmimalloc-sys exports; the -sys crate does not
/// export this one. `purge_delay_is_the_option_we_set` checks the index against the library.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds freed memory stays with the process before mimalloc returns it to the OS
/// (mimalloc's default is 10: shorter than one learner step).
pub const PURGE_DELAY_MS: i64 = 1000;

/// Threads per tensor op when the user has not chosen (`RAYON_NUM_THREADS`, read by candle's
/// thread pool and gemm). tilt's roles already run in parallel, one blocking thread each, so
/// parallelism inside every op oversubscribes the cores: on 2 cores the quickstart learner ran
/// 71.6 steps/s with 1 thread per op against 61.6 with 2 (README, "Performance").
pub const DEFAULT_OP_THREADS: &str = "1";

/// Set `RAYON_NUM_THREADS` to [`DEFAULT_OP_THREADS`] unless the environment sets it. Call before
/// any other thread starts (an environment write races with readers in other threads).
pub fn default_op_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", DEFAULT_OP_THREADS);
    }
}

/// Apply tilt's allocator settings; call once at start (the binary and the benches do).
#[allow(unsafe_code)]
pub fn tune() {
    // SAFETY: mi_option_set stores an integer in mimalloc's option table (an atomic write); the
    // option index is a valid `mi_option_t` of the linked library (tested below).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn purge_delay_is_the_option_we_set() {
        // The option right after purge_delay is use_numa_nodes (exported by the -sys crate):
        // setting ours must not move it, and reading ours back gives what was set.
        let numa = libmimalloc_sys::mi_option_use_numa_nodes;
        assert_eq!(MI_OPTION_PURGE_DELAY, numa - 1);
        // SAFETY: reads of valid option indices of the linked mimalloc.
        let before = unsafe { libmimalloc_sys::mi_option_get(numa) };
        tune();
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        let after = unsafe { libmimalloc_sys::mi_option_get(numa) };
        assert_eq!(delay as i64, PURGE_DELAY_MS);
        assert_eq!(before, after);
    }
}
