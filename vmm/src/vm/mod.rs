//! One guest: a KVM VM with one vCPU, or two where the run has a counter vCPU
//! (`counter.rs`), its RAM and the payload, run until it rings "done". Each vCPU runs on a
//! thread of its own, pinned and sandboxed.
//!
//! Setup order (each step in its own module): RAM sized from the samples asked for
//! (`memory`), the payload's segments (`loader`), the GDT, page tables and config block,
//! the CPUID table (from the process's [`kvm::KvmContext`]), then long-mode registers.
//! The run loop (`run.rs`) hands every exit ([`exit::Exit`]) to an
//! [`handler::ExitHandler`] and does what its [`handler::Flow`] says: the VM knows no
//! mode and no shaping (those live in `crate::modes` and `crate::shaping`), and counts
//! what each exit cost the VMM (`accounting`).

pub mod accounting;
pub mod counter;
pub mod exit;
pub mod handler;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod pm_timer;
mod run;
pub mod sandbox;
pub mod trace;
pub mod tsc;
pub mod vcpu;
pub mod watchdog;
pub mod worker;

use crate::arch::x86_64::{
    cpuid::{CpuidAnswers, CpuidTable},
    decode, regs,
};
use crate::host::{AffinityError, Placement};
use crate::results::{Results, ResultsError};
use accounting::ExitStats;
use exit::Exit;
use guest_payload::{layout, Config, Status};
use kvm::KvmContext;
use kvm_bindings::{kvm_fpu, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VmFd;
use loader::{LoaderError, Payload};
use memory::MemoryError;
use std::time::{Duration, Instant};
use vcpu::{KvmVcpu, RegisterAccess, Vcpu, VcpuError};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use watchdog::WatchdogError;

pub use run::RunError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "this KVM ({flavour}) does not offer userspace MSR exits (KVM_CAP_X86_USER_SPACE_MSR): the evasion cannot answer the guest's reads of MSR {msr:#x}"
    )]
    NoUserSpaceMsr { flavour: &'static str, msr: u32 },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Watchdog(#[from] WatchdogError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("cannot start the vCPU thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    #[error(transparent)]
    Counter(#[from] counter::CounterError),
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    #[error(transparent)]
    KvmContext(#[from] kvm::KvmError),
    #[error("the guest hung: it did not ring \"done\" within {timeout:?}; it was at RIP {rip}{} when stopped (a loop that never ends there, or a run longer than its timeout)", .place.as_ref().map_or(String::new(), |p| format!(", in {p}")))]
    GuestHung {
        timeout: Duration,
        rip: Rip,
        /// `symbol+offset` of the RIP in the payload, where its symbols name it.
        place: Option<String>,
    },
    #[error("the guest triple-faulted at RIP {rip} (KVM_EXIT_SHUTDOWN): an exception with no IDT to handle it")]
    TripleFault { rip: Rip },
    #[error("KVM could not run the guest instruction at RIP {rip}{} (KVM_EXIT_INTERNAL_ERROR, {what})", .instruction.as_ref().map_or(String::new(), |i| format!(", {i}")))]
    InternalError {
        what: &'static str,
        rip: Rip,
        /// The instruction there, decoded from guest memory (e.g. `rdtscp (0f 01 f9)`).
        instruction: Option<String>,
    },
    #[error("KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}) at RIP {rip}")]
    FailEntry { reason: u64, rip: Rip },
    #[error("the guest did {direction} on port {port:#x} at RIP {rip}: no device there")]
    UnexpectedPort {
        port: u16,
        direction: &'static str,
        rip: Rip,
    },
    #[error("the guest accessed MMIO address {addr:#x} at RIP {rip}: there is no device and no RAM there")]
    Mmio { addr: u64, rip: Rip },
    #[error("the guest halted at RIP {rip} without ringing \"done\"")]
    Halted { rip: Rip },
    #[error("unexpected exit from KVM_RUN ({what}) at RIP {rip}")]
    UnexpectedExit { what: String, rip: Rip },
    #[error("the guest stopped with status {value}: {}", Status::from_u32(*.value).map_or("a status this VMM does not know", Status::describe))]
    GuestStatus { value: u32 },
    #[error(transparent)]
    Results(#[from] ResultsError),
}

impl VmError {
    /// The same error, naming where in `payload`'s code a hang's RIP was.
    pub fn placed_in(self, payload: &Payload) -> Self {
        match self {
            VmError::GuestHung {
                timeout,
                rip,
                place: None,
            } => VmError::GuestHung {
                timeout,
                rip,
                place: rip.0.and_then(|addr| payload.place_of(addr)),
            },
            other => other,
        }
    }

    /// The RIP a fatal exit stopped at, where the error names one.
    pub fn rip(&self) -> Option<u64> {
        match self {
            VmError::GuestHung { rip, .. }
            | VmError::TripleFault { rip }
            | VmError::InternalError { rip, .. }
            | VmError::FailEntry { rip, .. }
            | VmError::UnexpectedPort { rip, .. }
            | VmError::Mmio { rip, .. }
            | VmError::Halted { rip }
            | VmError::UnexpectedExit { rip, .. } => rip.0,
            _ => None,
        }
    }
}

/// A guest RIP for messages; unknown if the registers could not be read.
#[derive(Clone, Copy, Debug)]
pub struct Rip(pub Option<u64>);

impl std::fmt::Display for Rip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(rip) => write!(f, "{rip:#x}"),
            None => f.write_str("(unknown)"),
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a run went, seen from the VMM.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub exits: ExitStats,
    /// The counter vCPU's part, where the run had one.
    pub counter: Option<CounterStats>,
    /// VM creation to the first KVM_RUN.
    pub setup: Duration,
    pub run: Duration,
}

/// What the counter vCPU went through in one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterStats {
    /// The host CPUs of vCPU 0 and of the counter vCPU.
    pub vcpu0_cpu: usize,
    pub counter_cpu: usize,
    /// Times it was stopped while an exit of vCPU 0 was handled (`pause-counter`).
    pub pauses: u64,
    /// TSC cycles vCPU 0's moves asked of it (`shared-offset`), and what it applied
    /// (never more backwards than it was paused): the difference is how far the two
    /// vCPUs' TSCs now disagree.
    pub shared_moves_wanted: i64,
    pub shared_moves_applied: i64,
    /// Host cycles each pause took to take hold (request to acknowledgement): mean and
    /// largest; 0 where there were none.
    pub pause_hold_cycles_mean: u64,
    pub pause_hold_cycles_max: u64,
}

/// A VM with one vCPU (two with a counter), set up and ready to run the payload once.
pub struct GuestVm {
    // Field order is drop order: the vCPUs before the VM that owns them.
    vcpu: KvmVcpu,
    counter: Option<counter::CounterVcpu>,
    vm: VmFd,
    config: Config,
    cpuid: CpuidTable,
    created: Instant,
    /// Where the vCPU threads run, where the caller chose it.
    placement: Option<Placement>,
}

impl GuestVm {
    /// Creates the VM, loads `payload` and writes `config` (its result area is set here).
    /// `answers`: what the guest's CPUID says where an evader changes it.
    pub fn create(
        kvm: &KvmContext,
        payload: &Payload,
        config: &Config,
        answers: CpuidAnswers,
    ) -> Result<Self, VmError> {
        let created = Instant::now();
        let mut config = *config;
        config.result_addr = layout::RESULT_ADDR;
        let ram_size = memory::ram_size_for(&config)?;
        config.result_capacity = memory::result_capacity_for(&config)?;

        let vm = kvm.kvm.create_vm().map_err(kvm_err("to create a VM (KVM_CREATE_VM)"))?;
        let memory = memory::allocate(ram_size)?;
        for (slot, region) in memory.iter().enumerate() {
            let region_info = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which outlives the VM
            // (both live in the returned GuestVm, and the VM fd is closed first).
            unsafe { vm.set_user_memory_region(region_info) }.map_err(kvm_err("the guest memory region"))?;
        }
        payload.load_into(&memory)?;
        memory::write_boot_structures(&memory, &config)?;

        let counter = if config.counter_addr != 0 {
            config.counter_addr = layout::COUNTER_BLOCK_ADDR;
            for (addr, bytes) in counter::code_and_stack() {
                memory::write(&memory, "the counter vCPU's code", addr, &bytes)?;
            }
            // The config block says where the counter is: written again with the address.
            memory::write_boot_structures(&memory, &config)?;
            Some(counter::CounterVcpu::create(
                &vm,
                &kvm.cpuid_for(1, 2, answers)?,
                &memory,
            )?)
        } else {
            None
        };
        let vcpus = if counter.is_some() { 2 } else { 1 };
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("to create a vCPU"))?;
        vcpu.set_cpuid2(&kvm.cpuid_for(0, vcpus, answers)?)
            .map_err(kvm_err("the CPUID table (KVM_SET_CPUID2)"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        regs::setup_long_mode(&mut sregs);
        vcpu.set_sregs(&sregs)
            .map_err(kvm_err("the long-mode special registers (KVM_SET_SREGS)"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(kvm_err("the FPU state (KVM_SET_FPU)"))?;
        let entry = regs::entry_registers(payload.entry);
        vcpu.set_regs(&entry)
            .map_err(kvm_err("the entry registers (KVM_SET_REGS)"))?;

        // The table as KVM holds it now that CR4 is set (runtime bits such as OSXSAVE):
        // emulation must answer exactly what KVM would. The same for every VM built alike.
        let in_guest = &kvm.cpuid_in_guest[vcpus as usize - 1][answers.index()];
        let cpuid = match in_guest.get() {
            Some(table) => table.clone(),
            None => {
                let read = vcpu
                    .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_CPUID2"))?;
                in_guest.get_or_init(|| CpuidTable::from_kvm(&read)).clone()
            }
        };
        Ok(Self {
            vcpu: KvmVcpu::new(vcpu, memory, kvm.registers, entry),
            counter,
            vm,
            config,
            cpuid,
            created,
            placement: None,
        })
    }

    /// Runs vCPU 0 on `placement.timing` and the counter vCPU, if any, on its CPU
    /// (chosen by [`Placement::choose`] where the caller chooses none).
    pub fn place(&mut self, placement: Placement) {
        self.placement = Some(placement);
    }

    /// The CPUID table KVM holds for the vCPU.
    pub fn cpuid_table(&self) -> &CpuidTable {
        &self.cpuid
    }

    /// How registers travel at an exit in this VM.
    pub fn register_access(&self) -> RegisterAccess {
        self.vcpu.access()
    }

    fn rip(&mut self) -> Rip {
        Rip(self.vcpu.regs().ok().map(|r| r.rip))
    }

    /// The guest TSC minus the host's now, and the uncertainty of that reading.
    pub fn guest_tsc_offset(&self) -> Result<(i64, u64), VmError> {
        Ok(self.vcpu.guest_tsc_offset()?)
    }

    /// The guest's memory (for reading what it ran, after the run).
    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        self.vcpu.memory()
    }

    fn fatal(&mut self, exit: Exit) -> VmError {
        let rip = self.rip();
        match exit {
            Exit::IoOut { port, .. } => VmError::UnexpectedPort {
                port,
                direction: "an OUT",
                rip,
            },
            Exit::IoIn { port } => VmError::UnexpectedPort {
                port,
                direction: "an IN",
                rip,
            },
            Exit::Mmio { addr } => VmError::Mmio { addr, rip },
            Exit::Hlt => VmError::Halted { rip },
            Exit::Shutdown => VmError::TripleFault { rip },
            Exit::InternalError { suberror } => VmError::InternalError {
                what: internal_error_name(suberror),
                rip,
                instruction: rip.0.and_then(|rip| self.instruction_at(rip)),
            },
            Exit::FailEntry(reason) => VmError::FailEntry { reason, rip },
            Exit::Other(what) => VmError::UnexpectedExit { what, rip },
            Exit::RdMsr { .. } => VmError::UnexpectedExit {
                what: exit.kvm_name(),
                rip,
            },
            Exit::Interrupted | Exit::Debug { .. } => VmError::UnexpectedExit {
                what: format!("{exit:?}"),
                rip,
            },
        }
    }

    /// The guest instruction at `rip`, decoded, for messages.
    fn instruction_at(&self, rip: u64) -> Option<String> {
        let bytes = memory::read(self.vcpu.memory(), rip, decode::MAX_INSTRUCTION_BYTES)
            .or_else(|_| memory::read(self.vcpu.memory(), rip, 1))
            .ok()?;
        decode::describe(&bytes, rip)
    }

    /// Reads the result block the guest wrote.
    pub fn results(&self) -> Result<Results, VmError> {
        let memory = self.vcpu.memory();
        let base = self.config.result_addr;
        Ok(crate::results::parse_results(&self.config, |offset, len| {
            let addr = base
                .checked_add(offset)
                .ok_or(ResultsError::Invalid("a sample offset overflows"))?;
            memory::read(memory, addr, len).map_err(|e| ResultsError::Read(e.to_string()))
        })?)
    }
}

/// What the VM offers an exit policy before its vCPUs run, on the VMM's own thread (the
/// vCPU threads are sandboxed to their own vCPU: whole-VM settings are made here).
pub trait VmSetup {
    fn has_counter(&self) -> bool;
    /// Sets every vCPU's TSC rate (KVM_SET_TSC_KHZ; the caller checked KVM_CAP_TSC_CONTROL).
    fn set_tsc_khz(&mut self, khz: u32) -> Result<(), VmError>;
    /// Opens TSC moves on the counter vCPU, for moves vCPU 0 shares with it.
    fn enable_counter_tsc_moves(&mut self) -> Result<(), VmError>;
}

impl GuestVm {
    /// Makes the guest's reads of `msrs` exit to this VMM: KVM_CAP_X86_USER_SPACE_MSR for
    /// filtered accesses, and a KVM_X86_SET_MSR_FILTER that denies reading them (every
    /// other MSR stays KVM's), for an evader that answers them.
    pub fn trap_msr_reads(&mut self, msrs: &[u32]) -> Result<(), VmError> {
        use kvm_ioctls::{Cap, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
        if !self.vm.check_extension(Cap::X86UserSpaceMsr) {
            return Err(VmError::NoUserSpaceMsr {
                flavour: crate::host::kvm_flavour().0.describe(),
                msr: msrs.first().copied().unwrap_or_default(),
            });
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
            ..Default::default()
        };
        self.vm.enable_cap(&cap).map_err(kvm_err(
            "userspace MSR exits (KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR))",
        ))?;
        // One range per MSR, its one bit clear: reads denied, so they exit here.
        let denied = [0u8; 1];
        let ranges: Vec<MsrFilterRange<'_>> = msrs
            .iter()
            .map(|&base| MsrFilterRange {
                flags: MsrFilterRangeFlags::READ,
                base,
                msr_count: 1,
                bitmap: &denied,
            })
            .collect();
        self.vm
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(kvm_err("the MSR filter (KVM_X86_SET_MSR_FILTER)"))
    }
}

impl VmSetup for GuestVm {
    fn has_counter(&self) -> bool {
        self.counter.is_some()
    }

    fn set_tsc_khz(&mut self, khz: u32) -> Result<(), VmError> {
        self.vcpu.set_tsc_khz(khz)?;
        if let Some(counter) = &self.counter {
            counter.set_tsc_khz(khz)?;
        }
        Ok(())
    }

    fn enable_counter_tsc_moves(&mut self) -> Result<(), VmError> {
        if let Some(counter) = self.counter.as_mut() {
            counter.enable_tsc_moves()?;
        }
        Ok(())
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure: the instruction is not supported here",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "an exception while delivering another",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "an exception during event delivery",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "a hardware exit reason KVM does not handle",
        _ => "an unknown internal error",
    }
}
