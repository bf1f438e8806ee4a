//! The counter vCPU of `--vcpus 2`: a second vCPU of the same VM, on a host thread of its
//! own pinned to another CPU, running [`guest_payload::counter::LOOP_CODE`] for ever: a
//! clock in shared guest memory that a TSC offset does not touch (VMAware's `TIMER`
//! counter thread). It only leaves KVM_RUN when kicked: to stop at the end of the run,
//! or to pause while vCPU 0's exit is handled (`--evade pause-counter`, as an evader
//! pausing the counter thread with IPIs does).
//!
//! The pause is a handshake: vCPU 0's thread numbers its request, raises `pause`, kicks
//! the counter thread once — `kvm_run.immediate_exit` set, then the watchdog's signal, as
//! Firecracker kicks a vCPU: whether the signal lands inside KVM_RUN (EINTR) or just
//! before it (KVM_RUN then returns at once), the counter leaves the guest — and waits
//! until it has acknowledged that very request. The exit policy then handles its exit and
//! resumes it. While paused the counter thread applies any TSC move vCPU 0 shared with it
//! (`shared-offset`), never more backwards than it was paused: its own clock never runs
//! back. Pauses nest (two policies may each pause it): only the outermost one waits.

use super::exit::Exit;
use super::tsc::{TscError, TscMover};
use crate::arch::x86_64::{idt, regs as arch_regs};
use guest_payload::layout;
use guest_payload::timing::read_tsc;
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How long vCPU 0 waits in all for the counter to stop at the end of the run.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(2);
/// Why the counter faulted where the guest did not touch it: the platform's fault, which
/// a retry may not meet again (tests that run on QEMU's nested SVM retry on this text).
pub const KVM_FAULTED: &str = "its code, IDT and stack are intact and this VM has no interrupt controller: the KVM \
                               below (or what runs that KVM) did it (seen under QEMU's emulated nested SVM); run it again";
/// The counter's catch-all IDT and its stubs, in its code page between the loop and the
/// halt: VMM-owned memory the guest ABI gives the counter, never read by a payload.
const IDT_ADDR: u64 = layout::COUNTER_CODE_ADDR + 0x100;
const STUBS_ADDR: u64 = IDT_ADDR + idt::TABLE_BYTES as u64;

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
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CounterError {
    move |source| CounterError::Kvm { what, source }
}

/// The counter vCPU as an exit policy acts on it, from vCPU 0's thread while vCPU 0 is
/// stopped in an exit.
pub trait Counter {
    /// Stops the counter vCPU until [`Counter::resume`]; returns the host cycles it took
    /// to stop (0 for a nested pause: it was stopped already). `past_deadline` is the
    /// run's watchdog.
    fn pause(&self, past_deadline: &dyn Fn() -> bool) -> Result<u64, CounterError>;
    /// Undoes one pause, adding `tsc_move` to what its TSC is to be moved by; the
    /// outermost lets it go on, after making the moves.
    fn resume(&self, tsc_move: i64);
}

/// The counter vCPU, created with the VM and run by [`CounterVcpu::run`] on its thread.
pub struct CounterVcpu {
    fd: VcpuFd,
    tsc: Option<TscMover>,
    /// To read the exception frame of a fault.
    memory: GuestMemoryMmap,
}

impl CounterVcpu {
    /// Creates vCPU 1 in long mode at the loop, with its code, halt, catch-all IDT and
    /// stack in guest memory (written by the caller with [`code_and_stack`]).
    pub fn create(vm: &VmFd, cpuid: &kvm_bindings::CpuId, memory: &GuestMemoryMmap) -> Result<Self, CounterError> {
        let fd = vm.create_vcpu(1).map_err(kvm_err("to create the counter vCPU"))?;
        fd.set_cpuid2(cpuid)
            .map_err(kvm_err("the counter vCPU's CPUID table (KVM_SET_CPUID2)"))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        arch_regs::setup_long_mode(&mut sregs);
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = (idt::TABLE_BYTES - 1) as u16;
        fd.set_sregs(&sregs)
            .map_err(kvm_err("the counter vCPU's special registers (KVM_SET_SREGS)"))?;
        let mut entry = arch_regs::entry_registers(layout::COUNTER_CODE_ADDR);
        entry.rdi = layout::COUNTER_BLOCK_ADDR;
        entry.rsp = layout::COUNTER_STACK_TOP;
        fd.set_regs(&entry)
            .map_err(kvm_err("the counter vCPU's registers (KVM_SET_REGS)"))?;
        Ok(Self {
            fd,
            tsc: None,
            memory: memory.clone(),
        })
    }

    /// The vCPU's file descriptor, for its thread's sandbox.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Sets this vCPU's TSC rate, as vCPU 0's.
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), CounterError> {
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
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        control.immediate_exit.store(immediate_exit, Ordering::Release);
        control.started.store(true, Ordering::SeqCst);
        loop {
            // Cleared before the flags are read: a kick that sets it after this point
            // either finds the flags raised below, or makes the next KVM_RUN return.
            control.set_immediate_exit(0);
            if control.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if control.pause.load(Ordering::SeqCst) {
                // Acknowledge this very request (its number), and stand still until it is
                // lifted or a newer one comes: a stale acknowledgement can never answer
                // the next pause.
                let request = control.requests.load(Ordering::Acquire);
                let paused_at = read_tsc();
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
                        let paused = read_tsc().saturating_sub(paused_at);
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
                Exit::Hlt => return Err(CounterError::Stopped(self.why_halted())),
                Exit::Shutdown => return Err(CounterError::Stopped(self.why_shut_down())),
                other => return Err(CounterError::Stopped(other.kvm_name())),
            }
        }
    }

    /// Why the counter halted: a fault caught by its IDT, named from its frame, or the
    /// loop's own `ret`.
    fn why_halted(&self) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return "it halted (its registers could not be read)".into();
        };
        let Some(vector) = idt::vector_at(STUBS_ADDR, regs.rip) else {
            return format!("it left the loop and halted at RIP {:#x}", regs.rip);
        };
        let word = |at: u64| {
            let mut bytes = [0u8; 8];
            self.memory
                .read_slice(&mut bytes, GuestAddress(at))
                .ok()
                .map(|()| u64::from_le_bytes(bytes))
        };
        let (error_code, rip) = if idt::has_error_code(vector) {
            (word(regs.rsp), regs.rsp.checked_add(8).and_then(word))
        } else {
            (None, word(regs.rsp))
        };
        let Some(rip) = rip else {
            return format!(
                "it took {} (vector {vector}); its stack could not be read",
                idt::name(vector)
            );
        };
        format!(
            "it took {}; {}",
            idt::describe(vector, error_code, rip),
            self.whose_fault()
        )
    }

    /// A triple fault although the IDT catches every vector: one of the two candidates.
    fn why_shut_down(&self) -> String {
        format!(
            "KVM_EXIT_SHUTDOWN (triple fault), although its IDT catches every exception; {}",
            self.whose_fault()
        )
    }

    /// Who could have made the loop fault: the guest, by writing over the counter's code,
    /// IDT or stubs (vCPU 0 shares that memory), or the KVM below, where they are intact
    /// (the loop touches only its own block, and this VM has no interrupt controller).
    fn whose_fault(&self) -> &'static str {
        let intact = code_and_stack().iter().all(|(addr, bytes)| {
            let mut now = vec![0u8; bytes.len()];
            self.memory.read_slice(&mut now, GuestAddress(*addr)).is_ok() && now == *bytes
        });
        if intact {
            KVM_FAULTED
        } else {
            "its code, IDT or stack was overwritten (vCPU 0's guest shares that memory)"
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
    /// The counter vCPU's `kvm_run.immediate_exit`, set by a kick (null until it runs).
    immediate_exit: AtomicPtr<u8>,
    /// Pauses now in force (vCPU 0's thread only), and the TSC moves they gathered.
    depth: AtomicU32,
    gathered_move: AtomicI64,
    /// A pause that could not take hold: the counter's own error says why.
    pause_failed: AtomicBool,
    /// A TSC move vCPU 0 made, for the counter vCPU to make too while paused.
    shared_move: AtomicI64,
    /// Pauses made, and the TSC moves shared: asked and applied (the difference is what
    /// the two vCPUs' offsets now disagree by).
    pub pauses: AtomicU64,
    pub shared_wanted: AtomicI64,
    pub shared_applied: AtomicI64,
    /// Host cycles from each pause's request to its acknowledgement: summed and largest.
    pub hold_cycles_total: AtomicU64,
    pub hold_cycles_max: AtomicU64,
}

impl CounterControl {
    fn set_immediate_exit(&self, value: u8) {
        let field = self.immediate_exit.load(Ordering::Acquire);
        if !field.is_null() {
            // SAFETY: the field lies in the counter vCPU's `kvm_run` mapping, which lives
            // as long as the vCPU, itself alive until both threads are joined; every access
            // to it from this process is this atomic one (KVM reads it with READ_ONCE).
            unsafe { AtomicU8::from_ptr(field) }.store(value, Ordering::SeqCst);
        }
    }

    fn kick(&self) {
        if self.started.load(Ordering::SeqCst) {
            self.set_immediate_exit(1);
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

    /// Said by the counter's thread once its loop has returned.
    pub fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Whether a pause failed to take hold (the counter's own error then explains it).
    pub fn pause_failed(&self) -> bool {
        self.pause_failed.load(Ordering::Acquire)
    }

    /// Ends the counter thread's loop: kicked until it has returned (`finished`).
    pub fn stop(&self, finished: &AtomicBool) {
        self.stop.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while !finished.load(Ordering::Acquire) && start.elapsed() < HANDSHAKE_LIMIT {
            self.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Counter for CounterControl {
    /// One kick, then a wait for the acknowledgement of this very request, for as long
    /// as the run may last: a slow host, nested QEMU, can hold a thread off its CPU for
    /// seconds.
    fn pause(&self, past_deadline: &dyn Fn() -> bool) -> Result<u64, CounterError> {
        if self.depth.fetch_add(1, Ordering::Relaxed) > 0 {
            return Ok(0);
        }
        let asked = read_tsc();
        let request = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        self.pause.store(true, Ordering::SeqCst);
        self.kick();
        while self.acknowledged.load(Ordering::Acquire) != request {
            // Its thread is gone (the guest stopped it, made it fault or ring done): no
            // acknowledgement can come; its own error says why.
            let failed = if self.ended.load(Ordering::Acquire) {
                Some(CounterError::Ended)
            } else if past_deadline() {
                Some(CounterError::NoPause)
            } else {
                None
            };
            if let Some(error) = failed {
                self.pause_failed.store(true, Ordering::Release);
                return Err(error);
            }
            std::hint::spin_loop();
        }
        let held = read_tsc().saturating_sub(asked);
        self.hold_cycles_total.fetch_add(held, Ordering::Relaxed);
        self.hold_cycles_max.fetch_max(held, Ordering::Relaxed);
        Ok(held)
    }

    fn resume(&self, tsc_move: i64) {
        self.gathered_move.fetch_add(tsc_move, Ordering::Relaxed);
        if self.depth.fetch_sub(1, Ordering::Relaxed) == 1 {
            let gathered = self.gathered_move.swap(0, Ordering::Relaxed);
            self.shared_move.store(gathered, Ordering::Release);
            self.pause.store(false, Ordering::SeqCst);
        }
    }
}

/// The counter vCPU's code at [`layout::COUNTER_CODE_ADDR`], its catch-all IDT and stubs,
/// a `hlt` for its `ret`, and the return address on its stack: (address, bytes) to write
/// into guest RAM.
pub fn code_and_stack() -> [(u64, Vec<u8>); 5] {
    [
        (layout::COUNTER_CODE_ADDR, guest_payload::counter::LOOP_CODE.to_vec()),
        (IDT_ADDR, idt::table(STUBS_ADDR)),
        (STUBS_ADDR, idt::stubs()),
        (layout::COUNTER_HALT_ADDR, guest_payload::counter::HALT_CODE.to_vec()),
        (
            layout::COUNTER_STACK_TOP,
            layout::COUNTER_HALT_ADDR.to_le_bytes().to_vec(),
        ),
    ]
}

/// Pins the calling thread (a vCPU's) to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<(), CounterError> {
    crate::host::pin_current_thread(cpu).map_err(|source| CounterError::Pin { cpu, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_vcpus_code_halt_and_return_address_do_not_overlap() {
        let [(code, loop_code), (table, gates), (stubs, stub_code), (halt, halt_code), (stack, ret)] = code_and_stack();
        assert!(code + loop_code.len() as u64 <= table);
        assert!(table + gates.len() as u64 <= stubs);
        assert!(stubs + stub_code.len() as u64 <= halt);
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
