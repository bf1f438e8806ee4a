//! The watchdog: a guest that never rings "done" must not hang the VMM.
//!
//! At the deadline a helper thread kicks the vCPU thread out of KVM_RUN with a signal
//! (KVM_RUN returns EINTR), and keeps kicking every few milliseconds until the vCPU thread
//! has noticed: a single signal could land while that thread is in userspace, just before
//! it enters KVM_RUN again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

const KICK_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot start the watchdog thread: {0}")]
    Thread(std::io::Error),
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: its only purpose is to make KVM_RUN return EINTR.
}

fn install_handler() -> Result<(), WatchdogError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL
        .call_once(|| result = register_signal_handler(kick_signal(), on_kick).map_err(WatchdogError::SignalHandler));
    result
}

/// Armed for one run of one vCPU thread (the thread that arms it).
pub struct Watchdog {
    fired: Arc<AtomicBool>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    pub timeout: Duration,
}

impl Watchdog {
    /// Starts counting now; the calling thread is the one kicked at the deadline.
    pub fn arm(timeout: Duration) -> Result<Self, WatchdogError> {
        install_handler()?;
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let fired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (thread_fired, thread_stop) = (fired.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("vmm-watchdog".into())
            .spawn(move || watch(target, timeout, &thread_fired, &thread_stop))
            .map_err(WatchdogError::Thread)?;
        Ok(Self {
            fired,
            stop,
            thread: Some(thread),
            timeout,
        })
    }

    /// True once the deadline has passed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

fn watch(target: libc::pthread_t, timeout: Duration, fired: &AtomicBool, stop: &(Mutex<bool>, Condvar)) {
    let (lock, condvar) = stop;
    let Ok(guard) = lock.lock() else { return };
    let Ok((mut stopped, _)) = condvar.wait_timeout_while(guard, timeout, |stopped| !*stopped) else {
        return;
    };
    if *stopped {
        return;
    }
    fired.store(true, Ordering::Release);
    while !*stopped {
        // SAFETY: `target` is the vCPU thread, alive until it disarms us (Drop joins this
        // thread first); the signal has a handler installed.
        unsafe { libc::pthread_kill(target, kick_signal()) };
        match condvar.wait_timeout(stopped, KICK_INTERVAL) {
            Ok((guard, _)) => stopped = guard,
            Err(_) => return,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, condvar) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        condvar.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn fires_after_the_deadline_and_interrupts_a_blocking_call() {
        let watchdog = Watchdog::arm(Duration::from_millis(50)).unwrap();
        let start = Instant::now();
        // A blocking syscall stands in for KVM_RUN: the kick makes it return EINTR.
        let mut interrupted = false;
        while start.elapsed() < Duration::from_secs(5) {
            // SAFETY: plain sleep.
            if unsafe { libc::usleep(1_000_000) } != 0 {
                interrupted = true;
                break;
            }
        }
        assert!(interrupted, "the blocking call was never interrupted");
        assert!(watchdog.fired());
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn disarmed_in_time_it_never_fires() {
        let watchdog = Watchdog::arm(Duration::from_secs(60)).unwrap();
        assert!(!watchdog.fired());
        drop(watchdog);
    }
}
