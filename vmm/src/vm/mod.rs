//! One guest: a KVM VM with one vCPU, its RAM and the payload, run until it rings "done".
//!
//! Setup order (each step in its own module): RAM sized from the samples asked for
//! (`memory`), the payload's segments (`loader`), the GDT, page tables and config block,
//! the CPUID table, then long-mode registers. The run loop dispatches exits; exits that
//! only some modes expect go to that mode's [`CpuidExitHandler`].

pub mod exits;
pub mod loader;
pub mod memory;
pub mod watchdog;

use crate::arch::x86_64::{cpuid::CpuidTable, regs};
use crate::modes::{CpuidExitHandler, GuestContext, ModeError};
use exits::{ExitKind, ExitStats};
use guest_payload::{layout, ports, Config, Probe, ResultHeader, Status, ABI_VERSION, RESULT_MAGIC};
use kvm_bindings::{kvm_debug_exit_arch, kvm_fpu, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use loader::{LoaderError, Payload};
use memory::MemoryError;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use watchdog::{Watchdog, WatchdogError};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Watchdog(#[from] WatchdogError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error("the guest hung: it did not ring \"done\" within {timeout:?} (stopped at RIP {rip}); raise --timeout if the run is just long")]
    GuestHung { timeout: Duration, rip: Rip },
    #[error("the guest triple-faulted at RIP {rip} (KVM_EXIT_SHUTDOWN): an exception with no IDT to handle it")]
    TripleFault { rip: Rip },
    #[error("KVM could not run the guest instruction at RIP {rip} (KVM_EXIT_INTERNAL_ERROR, {what})")]
    InternalError { what: &'static str, rip: Rip },
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
    #[error("the result block is not valid: {0}")]
    BadResults(&'static str),
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

/// What one guest measured.
#[derive(Clone, Debug, Default)]
pub struct GuestResults {
    pub samples: BTreeMap<Probe, Vec<u64>>,
    pub cpuid: Vec<guest_payload::CpuidRecord>,
    /// The bytes at each CPUID site as the guest read its own code (with the snapshot).
    pub site_bytes: Vec<[u8; 2]>,
}

/// How a run went, seen from the VMM.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub exits: ExitStats,
    pub run: Duration,
}

/// A VM with one vCPU, set up and ready to run the payload once.
pub struct GuestVm {
    // Field order is drop order: the vCPU before the VM that owns it.
    vcpu: VcpuFd,
    _vm: VmFd,
    memory: GuestMemoryMmap,
    payload: Payload,
    config: Config,
    cpuid: CpuidTable,
    created: Instant,
    /// The vCPU's TSC frequency as KVM reports it, if it does.
    pub tsc_khz: Option<u32>,
}

impl GuestVm {
    /// Creates the VM, loads `payload` and writes `config` (its result area is set here).
    pub fn create(kvm: &Kvm, payload: &Payload, config: &Config) -> Result<Self, VmError> {
        let created = Instant::now();
        let mut config = *config;
        config.result_addr = layout::RESULT_ADDR;
        let ram_size = memory::ram_size_for(&config)?;
        config.result_capacity = ram_size - layout::RESULT_ADDR;

        let vm = kvm.create_vm().map_err(kvm_err("to create a VM (KVM_CREATE_VM)"))?;
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

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("to create a vCPU"))?;
        let mut supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut table = CpuidTable::from_kvm(&supported);
        table.normalise_for_single_vcpu();
        for (slot, entry) in supported.as_mut_slice().iter_mut().zip(table.entries()) {
            *slot = *entry;
        }
        vcpu.set_cpuid2(&supported)
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
        vcpu.set_regs(&regs::entry_registers(payload.entry))
            .map_err(kvm_err("the entry registers (KVM_SET_REGS)"))?;

        // Read the table back now that CR4 is set: KVM keeps runtime bits (OSXSAVE...)
        // in it, and emulation must answer exactly what KVM would.
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?;
        let tsc_khz = vcpu.get_tsc_khz().ok().filter(|&khz| khz > 0);
        Ok(Self {
            vcpu,
            _vm: vm,
            memory,
            payload: payload.clone(),
            config,
            cpuid: CpuidTable::from_kvm(&cpuid),
            created,
            tsc_khz,
        })
    }

    /// The CPUID table KVM holds for the vCPU.
    pub fn cpuid_table(&self) -> &CpuidTable {
        &self.cpuid
    }

    fn context(&self) -> GuestContext<'_> {
        GuestContext {
            vcpu: &self.vcpu,
            memory: &self.memory,
            cpuid: &self.cpuid,
            payload: &self.payload,
        }
    }

    fn rip(&self) -> Rip {
        Rip(self.vcpu.get_regs().ok().map(|r| r.rip))
    }

    /// Runs the guest until it rings "done", a fatal exit, or the watchdog. Returns the
    /// setup time (VM creation to the first KVM_RUN) with the run's statistics.
    pub fn run(
        &mut self,
        handler: &mut dyn CpuidExitHandler,
        timeout: Duration,
        mut console: Option<&mut dyn Write>,
    ) -> Result<(Duration, RunStats), VmError> {
        handler.arm(&self.context())?;
        let expected_cpuid_exits = (self.config.iterations + self.config.warmup) as usize;
        let mut stats = RunStats {
            exits: ExitStats::with_expected_cpuid_exits(expected_cpuid_exits),
            ..Default::default()
        };
        let watchdog = Watchdog::arm(timeout)?;
        let setup = self.created.elapsed();
        let started = Instant::now();
        let result = self.run_loop(handler, &watchdog, &mut stats, &mut console);
        stats.run = started.elapsed();
        result.map(|()| (setup, stats))
    }

    fn run_loop(
        &mut self,
        handler: &mut dyn CpuidExitHandler,
        watchdog: &Watchdog,
        stats: &mut RunStats,
        console: &mut Option<&mut dyn Write>,
    ) -> Result<(), VmError> {
        loop {
            if watchdog.fired() {
                return Err(VmError::GuestHung {
                    timeout: watchdog.timeout,
                    rip: self.rip(),
                });
            }
            let exit = Exit::from_kvm(self.vcpu.run());
            let exit_tsc = guest_payload::timing::read_tsc();
            let kind = match exit {
                Exit::Interrupted => ExitKind::Signal,
                Exit::IoOut {
                    port: ports::CONSOLE,
                    value,
                    ..
                } => {
                    let byte = value as u8;
                    if let Some(out) = console.as_mut() {
                        let _ = out.write_all(&[byte]);
                    }
                    ExitKind::Console
                }
                Exit::IoOut {
                    port: ports::DONE,
                    value,
                    ..
                } => {
                    stats
                        .exits
                        .record(ExitKind::Done, guest_payload::timing::read_tsc() - exit_tsc);
                    return match Status::from_u32(value) {
                        Some(Status::Ok) => Ok(()),
                        _ => Err(VmError::GuestStatus { value }),
                    };
                }
                Exit::IoOut {
                    port: ports::HYPERCALL, ..
                } => handler.on_hypercall(&self.context(), exit_tsc)?,
                Exit::Debug(arch) => handler.on_debug(&self.context(), &arch, exit_tsc)?,
                Exit::InternalError if self.internal_suberror() == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                    let handled = match self.rip().0 {
                        Some(at) => handler.on_emulation_failure(&self.context(), at, exit_tsc)?,
                        None => None,
                    };
                    match handled {
                        Some(kind) => kind,
                        None => return Err(self.fatal(Exit::InternalError)),
                    }
                }
                fatal => return Err(self.fatal(fatal)),
            };
            stats.exits.record(kind, guest_payload::timing::read_tsc() - exit_tsc);
        }
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
            Exit::InternalError => VmError::InternalError {
                what: internal_error_name(self.internal_suberror()),
                rip,
            },
            Exit::FailEntry(reason) => VmError::FailEntry { reason, rip },
            Exit::Other(what) => VmError::UnexpectedExit { what, rip },
            Exit::Interrupted | Exit::Debug(_) => VmError::UnexpectedExit {
                what: format!("{exit:?}"),
                rip,
            },
        }
    }

    /// After KVM_EXIT_INTERNAL_ERROR: which internal error.
    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: only called for KVM_EXIT_INTERNAL_ERROR exits, where `internal` is the
        // union member KVM filled in.
        unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// Reads the result block the guest wrote.
    pub fn results(&self) -> Result<GuestResults, VmError> {
        let header_bytes = memory::read(
            &self.memory,
            self.config.result_addr,
            std::mem::size_of::<ResultHeader>(),
        )?;
        let header = ResultHeader::from_bytes(&header_bytes).ok_or(VmError::BadResults("too short"))?;
        if header.magic != RESULT_MAGIC {
            return Err(VmError::BadResults("the guest never wrote its magic"));
        }
        if header.abi_version != ABI_VERSION {
            return Err(VmError::BadResults("the guest speaks another ABI version"));
        }
        if header.iterations != self.config.iterations || header.probes != self.config.probes {
            return Err(VmError::BadResults(
                "the guest measured something other than what was asked",
            ));
        }
        let mut results = GuestResults::default();
        for probe in guest_payload::probes_in(header.probes) {
            let offset = header
                .sample_offset(probe)
                .ok_or(VmError::BadResults("a probe without samples"))?;
            let bytes = memory::read(
                &self.memory,
                self.config.result_addr + offset,
                header.iterations as usize * 8,
            )?;
            let samples = bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            results.samples.insert(probe, samples);
        }
        let count = (header.cpuid_count as usize).min(header.cpuid.len());
        results.cpuid = header.cpuid[..count].to_vec();
        if header.site_bytes_valid != 0 {
            let sites = guest_payload::timing::CPUID_SITE_SYMBOLS.len();
            results.site_bytes = header.site_bytes[..sites].to_vec();
        }
        Ok(results)
    }
}

/// A KVM exit, copied out of the shared `kvm_run` page so the vCPU can be used again.
#[derive(Debug)]
enum Exit {
    IoOut { port: u16, value: u32 },
    IoIn { port: u16 },
    Mmio { addr: u64 },
    Debug(kvm_debug_exit_arch),
    Hlt,
    Shutdown,
    InternalError,
    FailEntry(u64),
    Interrupted,
    Other(String),
}

impl Exit {
    fn from_kvm(exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Self {
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut value = [0u8; 4];
                let len = data.len().min(4);
                value[..len].copy_from_slice(&data[..len]);
                Exit::IoOut {
                    port,
                    value: u32::from_le_bytes(value),
                }
            }
            Ok(VcpuExit::IoIn(port, _)) => Exit::IoIn { port },
            Ok(VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _)) => Exit::Mmio { addr },
            Ok(VcpuExit::Debug(arch)) => Exit::Debug(arch),
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::InternalError) => Exit::InternalError,
            Ok(VcpuExit::FailEntry(reason, _)) => Exit::FailEntry(reason),
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
        }
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
