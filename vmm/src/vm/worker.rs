//! vCPU 0's thread, kept from one VM to the next. A thread of its own per VM cost ~130 µs
//! of every VM's setup here (spawning it ~50, pinning it ~10, installing its seccomp
//! filter ~70): more than KVM_SET_CPUID2, the sregs and the regs together. So the thread
//! that ran the last VM is kept, pinned and sandboxed, and runs the next one too where it
//! can: same CPU, and a vCPU descriptor of the same number (its filter allows ioctls on
//! that number only; VMs come and go one after another, and their descriptors' numbers
//! repeat). Otherwise a new one is made, and the old one ends.

use super::sandbox::{self, SandboxError};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot pin the vCPU thread to CPU {cpu}: {source}")]
    Pin { cpu: usize, source: std::io::Error },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("the vCPU thread ended before it ran its job")]
    Gone,
}

/// A job for the kept thread, its lifetime erased (see [`on_vcpu_thread`]).
type Job = Box<dyn FnOnce() + Send + 'static>;

/// The kept thread: where it runs and what its filter allows, and its queue.
struct Worker {
    cpu: usize,
    vcpu_fd: std::os::fd::RawFd,
    jobs: Sender<Job>,
    /// One message per job, sent once the job (and everything it borrowed) is gone.
    done: Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop.
        let (closed, _) = channel();
        self.jobs = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

static KEPT: Mutex<Option<Worker>> = Mutex::new(None);

impl Worker {
    /// A thread pinned to `cpu` and sandboxed to `vcpu_fd`, waiting for jobs.
    fn start(cpu: usize, vcpu_fd: std::os::fd::RawFd) -> Result<Self, WorkerError> {
        let (jobs, queue) = channel::<Job>();
        let (finished, done) = channel::<()>();
        let (ready_tx, ready) = channel::<Result<(), WorkerError>>();
        let thread = std::thread::Builder::new()
            .name("vmm-vcpu0".into())
            .spawn(move || {
                let prepared = crate::host::pin_current_thread(cpu)
                    .map_err(|source| WorkerError::Pin { cpu, source })
                    .and_then(|()| Ok(sandbox::enter(vcpu_fd)?));
                let failed = prepared.is_err();
                let _ = ready_tx.send(prepared);
                if failed {
                    return;
                }
                while let Ok(job) = queue.recv() {
                    job();
                    if finished.send(()).is_err() {
                        break;
                    }
                }
                // Any job still queued goes before the caller can learn the thread is
                // gone (it waits on `finished`).
                drop(queue);
                drop(finished);
            })
            .map_err(WorkerError::Spawn)?;
        let worker = Self {
            cpu,
            vcpu_fd,
            jobs,
            done,
            thread: Some(thread),
        };
        ready.recv().map_err(|_| WorkerError::Gone)??;
        Ok(worker)
    }
}

/// Runs `job` on vCPU 0's thread for a vCPU whose descriptor is `vcpu_fd`, pinned to
/// `cpu`, and returns what it returned; waits for it, whatever it borrows. A panic in the
/// job is carried over to the caller.
pub fn on_vcpu_thread<'a, R: Send + 'a>(
    cpu: usize,
    vcpu_fd: std::os::fd::RawFd,
    job: impl FnOnce() -> R + Send + 'a,
) -> Result<R, WorkerError> {
    let mut kept = KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let reusable = kept.as_ref().is_some_and(|w| w.cpu == cpu && w.vcpu_fd == vcpu_fd);
    if !reusable {
        // The old thread ends first: two threads never share a CPU for a moment.
        *kept = None;
        *kept = Some(Worker::start(cpu, vcpu_fd)?);
    }
    let worker = kept.as_ref().ok_or(WorkerError::Gone)?;
    let (result_tx, result) = channel::<std::thread::Result<R>>();
    let wrapped = move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        let _ = result_tx.send(outcome);
    };
    let wrapped: Box<dyn FnOnce() + Send + 'a> = Box::new(wrapped);
    // SAFETY: the job's borrows must outlive its run. This function does not return before
    // the thread said the job is done (`done`, sent after the job and its captures were
    // consumed), or before the thread is known gone (its sender dropped, and with it any
    // job it held, unrun or run): either way nothing of the job is left when the borrows
    // end. The job itself cannot unwind past the thread (caught above).
    let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, Job>(wrapped) };
    if worker.jobs.send(job).is_err() {
        *kept = None;
        return Err(WorkerError::Gone);
    }
    if worker.done.recv().is_err() {
        *kept = None;
        return Err(WorkerError::Gone);
    }
    drop(kept);
    match result.recv() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(WorkerError::Gone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_is_kept_for_the_same_cpu_and_descriptor_and_borrows_are_safe() {
        let cpu = *crate::host::allowed_cpus().last().unwrap();
        // SAFETY: gettid has no preconditions.
        let tid = || on_vcpu_thread(cpu, 2, || unsafe { libc::gettid() }).unwrap();
        let first = tid();
        assert_eq!(tid(), first, "kept");
        let mut borrowed = vec![1, 2, 3];
        on_vcpu_thread(cpu, 2, || borrowed.push(4)).unwrap();
        assert_eq!(borrowed, [1, 2, 3, 4]);
        // SAFETY: as above.
        let other = on_vcpu_thread(cpu, 3, || unsafe { libc::gettid() }).unwrap();
        assert_ne!(other, first, "another descriptor, another thread");
        let caught = std::panic::catch_unwind(|| on_vcpu_thread(cpu, 3, || panic!("in the job")));
        assert!(caught.is_err(), "a panic reaches the caller");
        assert_eq!(on_vcpu_thread(cpu, 3, || 7).unwrap(), 7, "and the thread goes on");
    }
}
