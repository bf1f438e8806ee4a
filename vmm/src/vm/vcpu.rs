//! The vCPU as exit handling sees it: its registers, its TSC, guest memory and the host's
//! clock, behind a small trait. The modes' handlers and the shaper take `&mut dyn Vcpu`,
//! so each is unit-tested with a simulated vCPU (`sim`), without /dev/kvm.
//!
//! [`KvmVcpu`] is the real one. It reads the general registers at most once per exit:
//! through `KVM_CAP_SYNC_REGS` where KVM offers it (KVM copies them into the shared
//! `kvm_run` page on every exit and takes them back when marked dirty: no ioctl at all),
//! else with one KVM_GET_REGS, and one KVM_SET_REGS before re-entry only if they changed.

use super::counter::Counter;
use super::exit::Exit;
use super::tsc::{TscError, TscMethod, TscMover};
use kvm_bindings::{kvm_guest_debug, kvm_regs};
use kvm_ioctls::{SyncReg, VcpuFd};
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot move the guest TSC: {0}")]
    Tsc(#[from] TscError),
    #[error("the guest TSC was moved before TSC moves were enabled for this vCPU")]
    TscMovesNotEnabled,
    #[error("an MSR read was answered where the guest read no filtered MSR")]
    NoMsrRead,
    #[error("a port read was answered where the guest read no port")]
    NoPortRead,
}

/// What a handler may do to the vCPU while it is stopped in an exit.
pub trait Vcpu {
    /// The general registers at this exit.
    fn regs(&mut self) -> Result<kvm_regs, VcpuError>;
    /// Replaces the general registers; they reach the guest when it re-enters.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError>;
    fn memory(&self) -> &GuestMemoryMmap;
    fn set_guest_debug(&mut self, debug: &kvm_guest_debug) -> Result<(), VcpuError>;
    /// Prepares TSC moves (once, before the run) and says how they will be made.
    fn enable_tsc_moves(&mut self) -> Result<TscMethod, VcpuError>;
    /// Makes the guest's TSC read `delta` cycles later (earlier if negative).
    fn move_tsc(&mut self, delta: i64) -> Result<(), VcpuError>;
    /// The host's TSC now: the clock exit handling measures itself with.
    fn now(&self) -> u64;
    /// The guest's TSC minus the host's: what the guest's own RDTSC would read, less
    /// [`Vcpu::now`] (for a VMM that answers trapped RDTSCs).
    fn tsc_offset(&mut self) -> Result<i64, VcpuError>;
    /// The guest's privilege level now (CS's low two bits), for an evader that answers
    /// user mode differently.
    fn cpl(&mut self) -> Result<u8, VcpuError>;
    /// TSC moves made since the last call, summed (what a shared offset passes on).
    fn take_moved(&mut self) -> i64;
    /// The value the guest's filtered RDMSR reads, at a `Exit::RdMsr`.
    fn reply_msr(&mut self, data: u64) -> Result<(), VcpuError>;
    /// The value the guest's `in` reads, at an `Exit::IoIn` (its low bytes, as wide as
    /// the read).
    fn reply_port(&mut self, data: u32) -> Result<(), VcpuError>;
    /// Delivers exception `vector` (no error code) to the guest at its next entry: the
    /// guest's own #DB, which KVM hands to the VMM while the VMM's debug registers are
    /// armed, given back as the guest would have taken it.
    fn inject_exception(&mut self, vector: u8) -> Result<(), VcpuError>;
    /// Writes back registers a handler changed, now rather than at the next KVM_RUN: an
    /// exit's cost is decided once they are back.
    fn flush(&mut self) -> Result<(), VcpuError> {
        Ok(())
    }
    /// The run's counter vCPU, where it has one.
    fn counter(&self) -> Option<&dyn Counter> {
        None
    }
    /// True once the run's deadline has passed: work inside an exit (an injected spin)
    /// stops, and the run loop reports the guest as hung.
    fn past_deadline(&self) -> bool {
        false
    }
}

/// How the registers travel between KVM and the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterAccess {
    /// KVM_CAP_SYNC_REGS: in the shared `kvm_run` page, no ioctl per exit.
    SyncRegs,
    /// KVM_GET_REGS once per exit that needs them, KVM_SET_REGS once if they changed.
    Ioctls,
}

/// A KVM vCPU with its guest memory.
pub struct KvmVcpu {
    fd: VcpuFd,
    memory: GuestMemoryMmap,
    access: RegisterAccess,
    /// Ioctl access: the registers read at this exit, and whether a handler changed them.
    cached: Option<kvm_regs>,
    dirty: bool,
    tsc: Option<TscMover>,
    /// TSC moves made since [`KvmVcpu::take_moved`] last looked (for a shared offset).
    moved: i64,
    /// Set by the watchdog at the run's deadline.
    deadline: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The counter vCPU's controls, for the length of a run with one.
    counter: Option<std::sync::Arc<super::counter::CounterControl>>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { what, source }
}

impl KvmVcpu {
    /// The vCPU's file descriptor: the one its thread's sandbox lets KVM ioctls reach.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// `entry` are the registers the vCPU starts with (already set with KVM_SET_REGS):
    /// the shared page holds them too until KVM first fills it, so nothing reads zeros.
    pub fn new(mut fd: VcpuFd, memory: GuestMemoryMmap, access: RegisterAccess, entry: kvm_regs) -> Self {
        if access == RegisterAccess::SyncRegs {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.sync_regs_mut().regs = entry;
        }
        Self {
            fd,
            memory,
            access,
            cached: None,
            dirty: false,
            tsc: None,
            moved: 0,
            deadline: None,
            counter: None,
        }
    }

    /// The counter vCPU an exit policy may pause, for this run.
    pub fn attach_counter(&mut self, counter: Option<std::sync::Arc<super::counter::CounterControl>>) {
        self.counter = counter;
    }

    /// The watchdog's flag for this run (see [`Vcpu::past_deadline`]).
    pub fn watch_deadline(&mut self, fired: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.deadline = Some(fired);
    }

    pub fn access(&self) -> RegisterAccess {
        self.access
    }

    /// The guest's TSC minus the host's now, and its uncertainty (see `tsc::guest_offset`).
    pub fn guest_tsc_offset(&self) -> Result<(i64, u64), VcpuError> {
        Ok(super::tsc::guest_offset(&self.fd)?)
    }

    /// Sets the vCPU's TSC rate (KVM_SET_TSC_KHZ; the caller checked KVM_CAP_TSC_CONTROL).
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), VcpuError> {
        self.fd
            .set_tsc_khz(khz)
            .map_err(kvm_err("the TSC rate (KVM_SET_TSC_KHZ)"))
    }

    /// Enters the guest until the next exit, copied out of `kvm_run`. Registers a handler
    /// changed are written back first.
    pub fn run(&mut self) -> Result<Exit, VcpuError> {
        self.flush()?;
        self.cached = None;
        let exit = Exit::from_kvm(self.fd.run());
        Ok(match exit {
            Exit::InternalError { .. } => Exit::InternalError {
                // SAFETY: KVM_EXIT_INTERNAL_ERROR: `internal` is the union member KVM filled.
                suberror: unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror },
            },
            other => other,
        })
    }
}

impl Vcpu for KvmVcpu {
    fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
        match self.access {
            RegisterAccess::SyncRegs => Ok(self.fd.sync_regs_mut().regs),
            RegisterAccess::Ioctls => match self.cached {
                Some(regs) => Ok(regs),
                None => {
                    let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                    self.cached = Some(regs);
                    Ok(regs)
                }
            },
        }
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        match self.access {
            RegisterAccess::SyncRegs => {
                self.fd.sync_regs_mut().regs = *regs;
                self.fd.set_sync_dirty_reg(SyncReg::Register);
            }
            RegisterAccess::Ioctls => {
                self.cached = Some(*regs);
                self.dirty = true;
            }
        }
        Ok(())
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn set_guest_debug(&mut self, debug: &kvm_guest_debug) -> Result<(), VcpuError> {
        self.fd.set_guest_debug(debug).map_err(kvm_err("KVM_SET_GUEST_DEBUG"))
    }

    fn enable_tsc_moves(&mut self) -> Result<TscMethod, VcpuError> {
        let mover = TscMover::open(&self.fd)?;
        let method = mover.method;
        self.tsc = Some(mover);
        Ok(method)
    }

    fn move_tsc(&mut self, delta: i64) -> Result<(), VcpuError> {
        let mover = self.tsc.as_mut().ok_or(VcpuError::TscMovesNotEnabled)?;
        mover.move_by(&self.fd, delta)?;
        self.moved = self.moved.saturating_add(delta);
        Ok(())
    }

    fn now(&self) -> u64 {
        guest_payload::timing::read_tsc()
    }

    fn tsc_offset(&mut self) -> Result<i64, VcpuError> {
        Ok(super::tsc::guest_offset(&self.fd)?.0)
    }

    fn cpl(&mut self) -> Result<u8, VcpuError> {
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok((sregs.cs.selector & 3) as u8)
    }

    fn inject_exception(&mut self, vector: u8) -> Result<(), VcpuError> {
        let mut events = self.fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.fd.set_vcpu_events(&events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
    }

    fn reply_msr(&mut self, data: u64) -> Result<(), VcpuError> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_X86_RDMSR {
            return Err(VcpuError::NoMsrRead);
        }
        // The last exit was KVM_EXIT_X86_RDMSR: `msr` is the union member KVM filled, and
        // it reads `data` and `error` back at the next KVM_RUN.
        run.__bindgen_anon_1.msr.data = data;
        run.__bindgen_anon_1.msr.error = 0;
        Ok(())
    }

    fn reply_port(&mut self, data: u32) -> Result<(), VcpuError> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_IO {
            return Err(VcpuError::NoPortRead);
        }
        // SAFETY: the last exit was KVM_EXIT_IO: `io` is the union member KVM filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        if u32::from(io.direction) != kvm_bindings::KVM_EXIT_IO_IN {
            return Err(VcpuError::NoPortRead);
        }
        let size = usize::from(io.size).min(4);
        let offset = usize::try_from(io.data_offset).map_err(|_| VcpuError::NoPortRead)?;
        // x86 KVM keeps port data in the page after kvm_run (KVM_PIO_PAGE_OFFSET = 1), inside
        // the vCPU's mapping (at least two pages there).
        const PIO_PAGE: usize = 4096;
        if offset < PIO_PAGE || offset + size > 2 * PIO_PAGE {
            return Err(VcpuError::NoPortRead);
        }
        // SAFETY: KVM put the data of this one-count port read at `data_offset`, in the
        // vCPU's mapping (checked above), and reads it back at the next KVM_RUN.
        unsafe {
            let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>().add(offset);
            std::ptr::copy_nonoverlapping(data.to_le_bytes().as_ptr(), base, size);
        }
        Ok(())
    }

    fn take_moved(&mut self) -> i64 {
        std::mem::take(&mut self.moved)
    }

    /// Ioctl access: one KVM_SET_REGS if a handler changed them (sync regs travel with
    /// the next KVM_RUN).
    fn flush(&mut self) -> Result<(), VcpuError> {
        if self.dirty {
            if let Some(regs) = self.cached {
                self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
            self.dirty = false;
        }
        Ok(())
    }

    fn counter(&self) -> Option<&dyn Counter> {
        self.counter.as_deref().map(|c| c as &dyn Counter)
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .as_ref()
            .is_some_and(|fired| fired.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// A simulated vCPU for unit tests: registers, a TSC offset, real guest memory, and a
/// host clock that moves only when told to (each call to `now` can cost some cycles, as
/// reading a real TSC does).
#[cfg(test)]
pub mod sim {
    use super::*;
    use std::cell::Cell;

    pub struct SimVcpu {
        pub regs: kvm_regs,
        pub memory: GuestMemoryMmap,
        pub debug: Option<kvm_guest_debug>,
        /// Guest TSC minus host TSC.
        pub tsc_offset: i64,
        pub tsc_moves: Option<TscMethod>,
        /// What the last filtered RDMSR was answered with.
        pub msr_reply: Option<u64>,
        pub port_reply: Option<u32>,
        pub host_tsc: Cell<u64>,
        /// Cycles each reading of the clock costs.
        pub clock_step: u64,
        pub regs_reads: Cell<u32>,
        pub regs_writes: u32,
        /// TSC moves since `take_moved` last looked.
        pub moved: i64,
        /// A counter vCPU, where the test gives the VM one.
        pub counter: Option<SimCounter>,
        /// The guest's privilege level.
        pub cpl: u8,
        /// Exceptions injected, in order.
        pub injected: Vec<u8>,
    }

    /// A counter vCPU for unit tests: it counts pauses, how deep they nest, and the TSC
    /// moves passed on when the outermost one ends; each pause takes `hold` cycles.
    #[derive(Default)]
    pub struct SimCounter {
        pub depth: Cell<u32>,
        pub pauses: Cell<u64>,
        pub tsc_moved: Cell<i64>,
        pub gathered: Cell<i64>,
        pub hold: u64,
        /// Fail every pause, as a counter vCPU that ended would.
        pub gone: bool,
    }

    impl Counter for SimCounter {
        fn pause(&self, _past_deadline: &dyn Fn() -> bool) -> Result<u64, crate::vm::counter::CounterError> {
            if self.gone {
                return Err(crate::vm::counter::CounterError::Ended);
            }
            self.depth.set(self.depth.get() + 1);
            if self.depth.get() > 1 {
                return Ok(0);
            }
            self.pauses.set(self.pauses.get() + 1);
            Ok(self.hold)
        }
        fn resume(&self, tsc_move: i64) {
            self.gathered.set(self.gathered.get() + tsc_move);
            self.depth.set(self.depth.get() - 1);
            if self.depth.get() == 0 {
                self.tsc_moved.set(self.tsc_moved.get() + self.gathered.replace(0));
            }
        }
    }

    impl Default for SimVcpu {
        fn default() -> Self {
            Self::new()
        }
    }

    impl SimVcpu {
        pub fn new() -> Self {
            Self {
                regs: kvm_regs::default(),
                memory: crate::vm::memory::allocate(guest_payload::layout::RESULT_ADDR + (2 << 20))
                    .expect("a few MiB of anonymous memory"),
                debug: None,
                tsc_offset: 0,
                tsc_moves: None,
                msr_reply: None,
                port_reply: None,
                host_tsc: Cell::new(1 << 40),
                clock_step: 0,
                regs_reads: Cell::new(0),
                regs_writes: 0,
                moved: 0,
                counter: None,
                cpl: 0,
                injected: Vec::new(),
            }
        }

        pub fn advance(&self, cycles: u64) {
            self.host_tsc.set(self.host_tsc.get() + cycles);
        }

        pub fn guest_tsc(&self) -> i64 {
            self.host_tsc.get() as i64 + self.tsc_offset
        }
    }

    impl Vcpu for SimVcpu {
        fn regs(&mut self) -> Result<kvm_regs, VcpuError> {
            self.regs_reads.set(self.regs_reads.get() + 1);
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
            self.regs_writes += 1;
            self.regs = *regs;
            Ok(())
        }
        fn memory(&self) -> &GuestMemoryMmap {
            &self.memory
        }
        fn set_guest_debug(&mut self, debug: &kvm_guest_debug) -> Result<(), VcpuError> {
            self.debug = Some(*debug);
            Ok(())
        }
        fn enable_tsc_moves(&mut self) -> Result<TscMethod, VcpuError> {
            self.tsc_moves = Some(TscMethod::VcpuTscOffset);
            Ok(TscMethod::VcpuTscOffset)
        }
        fn move_tsc(&mut self, delta: i64) -> Result<(), VcpuError> {
            if self.tsc_moves.is_none() {
                return Err(VcpuError::TscMovesNotEnabled);
            }
            self.tsc_offset += delta;
            self.moved += delta;
            Ok(())
        }
        fn now(&self) -> u64 {
            self.advance(self.clock_step);
            self.host_tsc.get()
        }
        fn take_moved(&mut self) -> i64 {
            std::mem::take(&mut self.moved)
        }
        fn tsc_offset(&mut self) -> Result<i64, VcpuError> {
            Ok(self.tsc_offset)
        }
        fn cpl(&mut self) -> Result<u8, VcpuError> {
            Ok(self.cpl)
        }
        fn inject_exception(&mut self, vector: u8) -> Result<(), VcpuError> {
            self.injected.push(vector);
            Ok(())
        }
        fn reply_msr(&mut self, data: u64) -> Result<(), VcpuError> {
            self.msr_reply = Some(data);
            Ok(())
        }
        fn reply_port(&mut self, data: u32) -> Result<(), VcpuError> {
            self.port_reply = Some(data);
            Ok(())
        }
        fn counter(&self) -> Option<&dyn Counter> {
            self.counter.as_ref().map(|c| c as &dyn Counter)
        }
    }
}
