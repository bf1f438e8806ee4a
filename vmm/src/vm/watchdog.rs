//! The watchdog: a guest that never rings "done" must not hang the VMM.
//!
//! One thread per process watches every armed run (started on first use, never per VM).
//! At a run's deadline it kicks that run's vCPU thread out of KVM_RUN with a signal
//! (KVM_RUN returns EINTR), and keeps kicking every few milliseconds until the run is
//! disarmed: a single signal could land while the vCPU thread is in userspace, just
//! before it enters KVM_RUN again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

const KICK_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot start the watchdog thread: {0}")]
    Thread(String),
}

/// The signal that makes a vCPU thread leave KVM_RUN (its handler does nothing).
pub(crate) fn kick_signal() -> libc::c_int {
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

/// One armed run.
struct Job {
    id: u64,
    thread: libc::pthread_t,
    deadline: Instant,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Jobs {
    next_id: u64,
    armed: Vec<Job>,
}

/// The process's watchdog thread and what it watches.
struct Service {
    jobs: Mutex<Jobs>,
    changed: Condvar,
}

fn service() -> Result<&'static Service, WatchdogError> {
    static SERVICE: OnceLock<Result<&'static Service, String>> = OnceLock::new();
    SERVICE
        .get_or_init(|| {
            let service: &'static Service = Box::leak(Box::new(Service {
                jobs: Mutex::new(Jobs::default()),
                changed: Condvar::new(),
            }));
            std::thread::Builder::new()
                .name("vmm-watchdog".into())
                .spawn(move || watch(service))
                .map(|_| service)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(WatchdogError::Thread)
}

fn watch(service: &Service) {
    // A panic elsewhere while holding the lock must not stop every later watchdog.
    let mut jobs = service.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let now = Instant::now();
        let mut next_wake = None::<Instant>;
        for job in &jobs.armed {
            if job.deadline <= now {
                job.fired.store(true, Ordering::Release);
                // SAFETY: `thread` is a vCPU thread that is alive while its job is armed
                // (disarming removes the job under this lock before the thread can exit);
                // the signal has a handler installed.
                unsafe { libc::pthread_kill(job.thread, kick_signal()) };
                next_wake = Some(next_wake.map_or(now + KICK_INTERVAL, |w| w.min(now + KICK_INTERVAL)));
            } else {
                next_wake = Some(next_wake.map_or(job.deadline, |w| w.min(job.deadline)));
            }
        }
        // A kick sent just before a run disarms can still land after: harmless (the
        // handler does nothing), at worst one `signal` exit in the next run on that thread.
        jobs = match next_wake {
            Some(wake) => match service.changed.wait_timeout(jobs, wake.saturating_duration_since(now)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            },
            None => service
                .changed
                .wait(jobs)
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        };
    }
}

/// Armed for one run of one vCPU thread (the thread that arms it); disarmed on drop.
pub struct Watchdog {
    id: u64,
    fired: Arc<AtomicBool>,
    pub timeout: Duration,
    /// Not Send: it must be dropped (disarmed) on the thread it kicks, which is alive
    /// until then; moved elsewhere, a kick could reach a thread that has exited.
    _same_thread: std::marker::PhantomData<*const ()>,
}

/// The process-wide part (the signal handler, the thread), done before a vCPU thread
/// enters its sandbox, where neither could be set up.
pub fn prepare() -> Result<(), WatchdogError> {
    install_handler()?;
    service().map(|_| ())
}

impl Watchdog {
    /// Starts counting now; the calling thread is the one kicked at the deadline.
    pub fn arm(timeout: Duration) -> Result<Self, WatchdogError> {
        install_handler()?;
        let service = service()?;
        let fired = Arc::new(AtomicBool::new(false));
        let mut jobs = service.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        jobs.next_id += 1;
        let id = jobs.next_id;
        jobs.armed.push(Job {
            id,
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            deadline: Instant::now() + timeout,
            fired: fired.clone(),
        });
        drop(jobs);
        service.changed.notify_all();
        Ok(Self {
            id,
            fired,
            timeout,
            _same_thread: std::marker::PhantomData,
        })
    }

    /// True once the deadline has passed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// The flag the watchdog sets at the deadline, for work inside an exit (a handler's
    /// spin) that must stop there too.
    pub fn fired_flag(&self) -> Arc<AtomicBool> {
        self.fired.clone()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(service) = service() {
            let mut jobs = service.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            jobs.armed.retain(|job| job.id != self.id);
            drop(jobs);
            service.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleeps in a blocking call (as KVM_RUN blocks) until it is interrupted or `limit`
    /// passes; returns when it was interrupted, if it was.
    fn blocked_until_kicked(limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            // SAFETY: plain sleep; returns non-zero when a signal interrupts it.
            if unsafe { libc::usleep(20_000) } != 0 {
                return Some(start.elapsed());
            }
        }
        None
    }

    #[test]
    fn fires_after_the_deadline_and_interrupts_a_blocking_call() {
        let watchdog = Watchdog::arm(Duration::from_millis(50)).unwrap();
        let kicked = blocked_until_kicked(Duration::from_secs(5)).expect("the blocking call was never interrupted");
        assert!(watchdog.fired());
        assert!(
            kicked >= Duration::from_millis(45),
            "kicked before the deadline: {kicked:?}"
        );
        assert!(kicked < Duration::from_secs(2));
    }

    #[test]
    fn disarmed_in_time_it_never_fires_nor_kicks() {
        let watchdog = Watchdog::arm(Duration::from_millis(600)).unwrap();
        assert_eq!(blocked_until_kicked(Duration::from_millis(100)), None, "kicked early");
        assert!(!watchdog.fired());
        drop(watchdog);
        // Past the old deadline: a disarmed watchdog must leave the thread alone.
        assert_eq!(
            blocked_until_kicked(Duration::from_millis(800)),
            None,
            "kicked after disarming"
        );
    }

    #[test]
    fn runs_armed_one_after_another_share_one_thread_and_each_fires() {
        for _ in 0..3 {
            let watchdog = Watchdog::arm(Duration::from_millis(20)).unwrap();
            assert!(blocked_until_kicked(Duration::from_secs(2)).is_some());
            assert!(watchdog.fired());
        }
    }
}
