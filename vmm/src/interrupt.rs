//! SIGINT and SIGTERM during long work (`validate`, `compare`, `calibrate`): the handler
//! only records the signal; the command stops after the run in progress, reports what
//! finished (marked partial) and exits 128 + the signal, as a shell expects. A second
//! signal ends the process at once, with the same status.

use std::sync::atomic::{AtomicI32, Ordering};

static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(signal: libc::c_int) {
    // A second signal means "now": the run in progress may be what is stuck.
    if CAUGHT.swap(signal, Ordering::Relaxed) != 0 {
        // An output being written is not left behind half done (unlink only).
        crate::output::remove_temporaries();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// From now on SIGINT and SIGTERM are recorded instead of ending the process. A signal
/// that lands while a vCPU is in KVM_RUN makes it return (an `signal` exit the run loop
/// handles) and the run goes on to its end.
pub fn catch() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic (async-
        // signal-safe); no SA_RESTART, so blocking calls return EINTR as the run loop expects.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = record as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// The signal caught, if one was.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::Relaxed) {
        0 => None,
        signal => Some(signal),
    }
}

/// The signal's name, for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
