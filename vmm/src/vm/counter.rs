//! The counter vCPU of `--vcpus 2`: a second vCPU of the same VM, on a host thread of its
//! own pinned to another CPU, running [`guest_payload::counter::LOOP_CODE`] for ever: a
//! clock in shared guest memory that a TSC offset does not touch (VMAware's `TIMER`
//! counter thread). It only leaves KVM_RUN when kicked: to stop at the end of the run,
//! or to pause while vCPU 0's exit is handled (`--evade pause-counter`, as an evader
//! pausing the counter thread with IPIs does).
//!
//! The pause is a handshake: vCPU 0's thread numbers its request, raises `pause`, kicks
//! the counter thread (the watchdog's signal: KVM_RUN returns EINTR) until it has
//! acknowledged that very request, handles its exit, and lowers `pause`. While paused the counter thread applies any TSC move vCPU 0
//! shared with it (`--evade shared-offset`), never more backwards than it was paused: its
//! own clock never runs back.

use super::tsc::{TscError, TscMover};
use super::{kvm_err, Exit, VmError};
use crate::arch::x86_64::regs as arch_regs;
use guest_payload::layout;
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long vCPU 0 waits for the counter to stop before it kicks again.
const KICK_AGAIN: Duration = Duration::from_micros(50);
/// How long vCPU 0 waits in all for the counter to stop at the end of the run.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("the counter vCPU stopped: {0}")]
    Stopped(String),
    #[error("the counter vCPU did not pause before the run's deadline")]
    NoPause,
    #[error("the counter vCPU ended before it could pause")]
    Ended,
    #[error("cannot move the counter vCPU's TSC: {0}")]
    Tsc(#[from] TscError),
    #[error("cannot pin the counter vCPU's thread to CPU {cpu}: {source}")]
    Pin { cpu: usize, source: std::io::Error },
}

/// The counter vCPU, created with the VM and run by [`CounterVcpu::run`] on its thread.
pub struct CounterVcpu {
    fd: VcpuFd,
    tsc: Option<TscMover>,
}

impl CounterVcpu {
    /// Creates vCPU 1 in long mode at the loop, with its code, halt and stack in guest
    /// memory (written by the caller with [`code_and_stack`]).
    pub fn create(vm: &VmFd, cpuid: &kvm_bindings::CpuId) -> Result<Self, VmError> {
        let fd = vm.create_vcpu(1).map_err(kvm_err("to create the counter vCPU"))?;
        fd.set_cpuid2(cpuid)
            .map_err(kvm_err("the counter vCPU's CPUID table (KVM_SET_CPUID2)"))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        arch_regs::setup_long_mode(&mut sregs);
        fd.set_sregs(&sregs)
            .map_err(kvm_err("the counter vCPU's special registers (KVM_SET_SREGS)"))?;
        let mut entry = arch_regs::entry_registers(layout::COUNTER_CODE_ADDR);
        entry.rdi = layout::COUNTER_BLOCK_ADDR;
        entry.rsp = layout::COUNTER_STACK_TOP;
        fd.set_regs(&entry)
            .map_err(kvm_err("the counter vCPU's registers (KVM_SET_REGS)"))?;
        Ok(Self { fd, tsc: None })
    }

    /// The vCPU's file descriptor, for its thread's sandbox.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Sets this vCPU's TSC rate, as vCPU 0's.
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), VmError> {
        self.fd
            .set_tsc_khz(khz)
            .map_err(kvm_err("the counter vCPU's TSC rate (KVM_SET_TSC_KHZ)"))
    }

    /// Opens TSC moves on this vCPU (for a shared offset), before it runs.
    pub fn enable_tsc_moves(&mut self) -> Result<(), CounterError> {
        self.tsc = Some(TscMover::open(&self.fd)?);
        Ok(())
    }

    /// Runs the counter until `control.stop`, pausing when asked; on its own thread.
    pub fn run(&mut self, control: &CounterControl) -> Result<(), CounterError> {
        // SAFETY: pthread_self has no preconditions.
        control
            .thread
            .store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
        control.started.store(true, Ordering::Release);
        loop {
            if control.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if control.pause.load(Ordering::Acquire) {
                // Acknowledge this very request (its number), and stand still until it is
                // lifted or a newer one comes: a stale acknowledgement can never answer
                // the next pause.
                let request = control.requests.load(Ordering::Acquire);
                let paused_at = guest_payload::timing::read_tsc();
                control.acknowledged.store(request, Ordering::Release);
                while control.pause.load(Ordering::Acquire)
                    && control.requests.load(Ordering::Acquire) == request
                    && !control.stop.load(Ordering::Acquire)
                {
                    std::hint::spin_loop();
                }
                let shared = control.shared_move.swap(0, Ordering::AcqRel);
                if shared != 0 {
                    if let Some(mover) = self.tsc.as_mut() {
                        // Never back by more than the pause lasted: this vCPU's clock
                        // stood still that long, so it does not run backwards.
                        let paused = guest_payload::timing::read_tsc().saturating_sub(paused_at);
                        let applied = shared.max(-(i64::try_from(paused).unwrap_or(i64::MAX)));
                        mover.move_by(&self.fd, applied)?;
                        control.shared_applied.fetch_add(applied, Ordering::Relaxed);
                        control.shared_wanted.fetch_add(shared, Ordering::Relaxed);
                    }
                }
                control.pauses.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match Exit::from_kvm(self.fd.run()) {
                Exit::Interrupted => continue,
                Exit::Hlt => return Err(CounterError::Stopped("it left the loop and halted".into())),
                other => return Err(CounterError::Stopped(other.kvm_name())),
            }
        }
    }
}

/// What the two vCPU threads share.
#[derive(Default)]
pub struct CounterControl {
    stop: AtomicBool,
    /// Set by the counter's thread when its loop has returned, however it ended: a pause
    /// asked after that can never be acknowledged.
    ended: AtomicBool,
    pause: AtomicBool,
    /// Pause requests made, and the last one the counter thread stood still for.
    requests: AtomicU64,
    acknowledged: AtomicU64,
    started: AtomicBool,
    /// The counter thread's pthread_t, to kick.
    thread: AtomicU64,
    /// A TSC move vCPU 0 made, for the counter vCPU to make too while paused.
    shared_move: AtomicI64,
    /// Pauses made, and the TSC moves shared: asked and applied (the difference is what
    /// the two vCPUs' offsets now disagree by).
    pub pauses: AtomicU64,
    pub shared_wanted: AtomicI64,
    pub shared_applied: AtomicI64,
}

impl CounterControl {
    fn kick(&self) {
        if self.started.load(Ordering::Acquire) {
            // SAFETY: the counter thread is alive until it is joined, after `stop`; the
            // kick signal has a handler (watchdog::prepare ran before both threads).
            unsafe {
                libc::pthread_kill(
                    self.thread.load(Ordering::Acquire) as libc::pthread_t,
                    super::watchdog::kick_signal(),
                )
            };
        }
    }

    /// Stops the counter vCPU and waits until it is out of the guest (vCPU 0's thread),
    /// for as long as the run may last: `past_deadline` is the run's watchdog (a slow
    /// host, nested QEMU, can hold a thread off its CPU for seconds).
    pub fn pause(&self, past_deadline: impl Fn() -> bool) -> Result<(), CounterError> {
        let request = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
        self.pause.store(true, Ordering::Release);
        let paused = || self.acknowledged.load(Ordering::Acquire) == request;
        while !paused() {
            // Its thread is gone (the guest stopped it, made it fault or ring done): no
            // acknowledgement can come; its own error says why.
            if self.ended.load(Ordering::Acquire) {
                return Err(CounterError::Ended);
            }
            if past_deadline() {
                return Err(CounterError::NoPause);
            }
            self.kick();
            let kicked = Instant::now();
            while !paused() && kicked.elapsed() < KICK_AGAIN {
                std::hint::spin_loop();
            }
        }
        Ok(())
    }

    /// Said by the counter's thread once its loop has returned.
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Lets the paused counter vCPU go on, after making `shared_move` on its TSC too.
    pub fn resume(&self, shared_move: i64) {
        self.shared_move.store(shared_move, Ordering::Release);
        self.pause.store(false, Ordering::Release);
    }

    /// Ends the counter thread's loop: kicked until it has returned (`finished`).
    pub fn stop(&self, finished: &AtomicBool) {
        self.stop.store(true, Ordering::Release);
        let start = Instant::now();
        while !finished.load(Ordering::Acquire) && start.elapsed() < HANDSHAKE_LIMIT {
            self.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The counter vCPU's code at [`layout::COUNTER_CODE_ADDR`], a `hlt` for its `ret`, and
/// the return address on its stack: (address, bytes) to write into guest RAM.
pub fn code_and_stack() -> [(u64, Vec<u8>); 3] {
    [
        (layout::COUNTER_CODE_ADDR, guest_payload::counter::LOOP_CODE.to_vec()),
        (layout::COUNTER_HALT_ADDR, guest_payload::counter::HALT_CODE.to_vec()),
        (
            layout::COUNTER_STACK_TOP,
            layout::COUNTER_HALT_ADDR.to_le_bytes().to_vec(),
        ),
    ]
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), CounterError> {
    crate::native::pin_current_thread(cpu).map_err(|source| CounterError::Pin { cpu, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_vcpus_code_halt_and_return_address_do_not_overlap() {
        let [(code, loop_code), (halt, halt_code), (stack, ret)] = code_and_stack();
        assert!(code + loop_code.len() as u64 <= halt);
        assert!(halt + halt_code.len() as u64 <= stack);
        assert_eq!(u64::from_le_bytes(ret.try_into().unwrap()), halt);
        assert!(stack + 8 <= layout::STACK_BOTTOM);
    }

    #[test]
    fn the_loop_code_decodes_as_documented() {
        let code = guest_payload::counter::LOOP_CODE;
        let text = crate::arch::x86_64::decode::mnemonics(&code, layout::COUNTER_CODE_ADDR);
        assert_eq!(
            text,
            ["inc", "mov", "test", "je", "cmp", "je", "rdtsc", "shl", "or", "mov", "mov", "jmp", "ret"]
        );
    }
}
