//! One guest: a KVM VM with one vCPU (two with a counter: `counter.rs`), its RAM and the
//! payload, run until it rings "done". Each vCPU runs on a thread of its own, sandboxed.
//!
//! Setup order (each step in its own module): RAM sized from the samples asked for
//! (`memory`), the payload's segments (`loader`), the GDT, page tables and config block,
//! the CPUID table (from the process's [`kvm::KvmContext`]), then long-mode registers.
//! The run loop hands every exit to an [`exits::ExitHandler`] and does what it says: the
//! VM knows no mode (those live in `crate::modes`).

pub mod counter;
pub mod exits;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod sandbox;
pub mod trace;
pub mod tsc;
pub mod vcpu;
pub mod watchdog;

use crate::arch::x86_64::{cpuid::CpuidTable, decode, regs};
use exits::{Exit, ExitHandler, ExitKind, ExitStats, Flow, HandlerError};
use guest_payload::{layout, Config, Cycles, Probe, ResultHeader, Status, ABI_VERSION, RESULT_MAGIC};
use kvm::KvmContext;
use kvm_bindings::{kvm_fpu, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VmFd;
use loader::{LoaderError, Payload};
use memory::MemoryError;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vcpu::{KvmVcpu, RegisterAccess, Vcpu, VcpuError};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use watchdog::{Watchdog, WatchdogError};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
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
    Counter(#[from] counter::CounterError),
    #[error("the counter vCPU needs a CPU of its own, and this process may run on CPU {cpu} only")]
    NoCounterCpu { cpu: usize },
    /// The exit handler's own error (a mode's), kept whole.
    #[error(transparent)]
    Handler(HandlerError),
    #[error("the guest hung: it did not ring \"done\" within {timeout:?}; it was at RIP {rip}{} when stopped (a loop that never ends there, or a run longer than --timeout)", .place.as_ref().map_or(String::new(), |p| format!(", in {p}")))]
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
    #[error("the result block is not valid: {0}")]
    BadResults(&'static str),
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

/// The samples of one run, per probe.
pub type ProbeSamples = BTreeMap<Probe, Vec<Cycles>>;

/// What one guest measured.
#[derive(Clone, Debug, Default)]
pub struct GuestResults {
    pub samples: ProbeSamples,
    /// Counter ticks over each sample, where the run had a counter vCPU.
    pub ticks: ProbeSamples,
    /// TSC cycles and ticks over the guest's rate window, where it reported one.
    pub counter_rate: Option<(u64, u64)>,
    pub cpuid: Vec<guest_payload::CpuidRecord>,
    /// The bytes at each CPUID site as the guest read its own code (with the snapshot).
    pub site_bytes: Vec<[u8; 2]>,
    /// The payload's own verdict, where it reported one.
    pub verdict: Option<PayloadVerdictReport>,
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
}

/// How the VMM treats the counter vCPU while it handles vCPU 0's exits: the evasions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterEvasion {
    /// Stop the counter vCPU for the length of every exit vCPU 0 takes to userspace.
    pub pause: bool,
    /// Make vCPU 0's TSC moves on the counter vCPU too, while it is paused.
    pub share_offset: bool,
}

/// A VM with one vCPU (two with a counter), set up and ready to run the payload once.
pub struct GuestVm {
    // Field order is drop order: the vCPUs before the VM that owns them.
    vcpu: KvmVcpu,
    counter: Option<counter::CounterVcpu>,
    evasion: CounterEvasion,
    _vm: VmFd,
    config: Config,
    cpuid: CpuidTable,
    created: Instant,
    /// The host CPU vCPU 0 runs on (the run's timing CPU), where the caller chose one.
    cpu: Option<usize>,
}

impl GuestVm {
    /// Creates the VM, loads `payload` and writes `config` (its result area is set here).
    pub fn create(kvm: &KvmContext, payload: &Payload, config: &Config) -> Result<Self, VmError> {
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
            Some(counter::CounterVcpu::create(&vm, &kvm.cpuid)?)
        } else {
            None
        };
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("to create a vCPU"))?;
        vcpu.set_cpuid2(&kvm.cpuid)
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
        let cpuid = match kvm.cpuid_in_guest.get() {
            Some(table) => table.clone(),
            None => {
                let read = vcpu
                    .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_CPUID2"))?;
                kvm.cpuid_in_guest.get_or_init(|| CpuidTable::from_kvm(&read)).clone()
            }
        };
        Ok(Self {
            vcpu: KvmVcpu::new(vcpu, memory, kvm.registers, entry),
            counter,
            evasion: CounterEvasion::default(),
            _vm: vm,
            config,
            cpuid,
            created,
            cpu: None,
        })
    }

    /// Runs vCPU 0 on host CPU `cpu` (the counter, if any, on another).
    pub fn pin_to(&mut self, cpu: usize) {
        self.cpu = Some(cpu);
    }

    /// Whether the VM has a counter vCPU.
    pub fn has_counter(&self) -> bool {
        self.counter.is_some()
    }

    /// What the VMM does to the counter vCPU during vCPU 0's exits (needs a counter).
    pub fn set_counter_evasion(&mut self, evasion: CounterEvasion) -> Result<(), VmError> {
        if let Some(counter) = self.counter.as_mut() {
            if evasion.share_offset {
                counter.enable_tsc_moves()?;
            }
        }
        self.evasion = evasion;
        Ok(())
    }

    /// Sets every vCPU's TSC rate before the run (`--evade tsc-khz`).
    pub fn set_tsc_khz(&mut self, khz: u32) -> Result<(), VmError> {
        self.vcpu.set_tsc_khz(khz)?;
        if let Some(counter) = &self.counter {
            counter.set_tsc_khz(khz)?;
        }
        Ok(())
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

    /// Runs the guest until it rings "done", a fatal exit, or the watchdog.
    pub fn run(&mut self, handler: &mut dyn ExitHandler, timeout: Duration) -> Result<RunStats, VmError> {
        self.run_traced(handler, timeout, &mut trace::NoTrace)
    }

    /// The guest TSC minus the host's now, and the uncertainty of that reading.
    pub fn guest_tsc_offset(&self) -> Result<(i64, u64), VmError> {
        Ok(self.vcpu.guest_tsc_offset()?)
    }

    /// The guest's memory (for reading what it ran, after the run).
    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        self.vcpu.memory()
    }

    /// [`GuestVm::run`], telling `trace` about every exit.
    pub fn run_traced<T: trace::ExitTrace>(
        &mut self,
        handler: &mut dyn ExitHandler,
        timeout: Duration,
        trace: &mut T,
    ) -> Result<RunStats, VmError> {
        // The vCPU runs on a thread of its own, sandboxed once the VM is set up; the
        // caller's thread keeps its privileges (and its signals) for the rest of the work.
        watchdog::prepare()?;
        let cpus = crate::native::allowed_cpus();
        // With a counter, each vCPU has a CPU of its own: vCPU 0 the last this process may
        // use (as native runs), the counter another.
        let vcpu0 = self.cpu.unwrap_or(*cpus.last().unwrap_or(&0));
        let placement = match &self.counter {
            None => None,
            Some(_) => {
                let other = cpus.iter().copied().find(|&c| c != vcpu0);
                Some((vcpu0, other.ok_or(VmError::NoCounterCpu { cpu: vcpu0 })?))
            }
        };
        let pin_vcpu0 = placement.map(|(cpu, _)| cpu).or(self.cpu);
        let control = counter::CounterControl::default();
        let counter_finished = std::sync::atomic::AtomicBool::new(false);
        let mut counter_vcpu = self.counter.take();
        let evasion = self.evasion;
        let (control, counter_finished) = (&control, &counter_finished);
        let (result, counter_result) = std::thread::scope(|scope| {
            let counter_thread = match (counter_vcpu.as_mut(), placement) {
                (Some(counter), Some((_, cpu))) => Some(
                    std::thread::Builder::new()
                        .name("vmm-vcpu1-counter".into())
                        .spawn_scoped(scope, move || -> Result<(), VmError> {
                            let ran = counter::pin_current_thread(cpu)
                                .map_err(VmError::from)
                                .and_then(|()| Ok(sandbox::enter(counter.raw_fd())?))
                                .and_then(|()| Ok(counter.run(control)?));
                            counter_finished.store(true, std::sync::atomic::Ordering::Release);
                            control.mark_ended();
                            ran
                        })
                        .map_err(|e| VmError::Thread(e.to_string())),
                ),
                _ => None,
            }
            .transpose();
            let counter_thread = match counter_thread {
                Ok(thread) => thread,
                Err(error) => return (Err(error), None),
            };
            let with_counter = counter_thread.as_ref().map(|_| (control, evasion));
            let ran = std::thread::Builder::new()
                .name("vmm-vcpu0".into())
                .spawn_scoped(scope, move || {
                    if let Some(cpu) = pin_vcpu0 {
                        counter::pin_current_thread(cpu)?;
                    }
                    sandbox::enter(self.vcpu.raw_fd())?;
                    self.run_on_this_thread(handler, timeout, trace, with_counter)
                })
                .map_err(|e| VmError::Thread(e.to_string()))
                .and_then(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
            // vCPU 0 is done, however it ended: the counter stops with it.
            if counter_thread.is_some() {
                control.stop(counter_finished);
            }
            let counter_ran = counter_thread.map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
            (ran, counter_ran)
        });
        let mut stats = match (result, counter_result) {
            // The counter's own failure explains a guest that found its counter stalled,
            // or a pause it never acknowledged.
            (Err(VmError::GuestStatus { value }), Some(Err(counter))) if value == Status::CounterStalled as u32 => {
                return Err(counter)
            }
            (
                Err(VmError::Counter(counter::CounterError::NoPause | counter::CounterError::Ended)),
                Some(Err(counter)),
            ) => return Err(counter),
            (Err(error), _) => return Err(error),
            (Ok(_), Some(Err(counter))) => return Err(counter),
            (Ok(stats), _) => stats,
        };
        if let Some((vcpu0_cpu, counter_cpu)) = placement {
            use std::sync::atomic::Ordering::Relaxed;
            stats.counter = Some(CounterStats {
                vcpu0_cpu,
                counter_cpu,
                pauses: control.pauses.load(Relaxed),
                shared_moves_wanted: control.shared_wanted.load(Relaxed),
                shared_moves_applied: control.shared_applied.load(Relaxed),
            });
        }
        Ok(stats)
    }

    fn run_on_this_thread<T: trace::ExitTrace>(
        &mut self,
        handler: &mut dyn ExitHandler,
        timeout: Duration,
        trace: &mut T,
        counter: Option<(&counter::CounterControl, CounterEvasion)>,
    ) -> Result<RunStats, VmError> {
        handler.arm(&mut self.vcpu).map_err(VmError::Handler)?;
        // Sized before the run, as the shaper's: no reallocation inside an exit.
        let expected_cpuid_exits = usize::try_from(self.config.timing_core_cpuids()).unwrap_or(usize::MAX);
        let mut stats = RunStats {
            exits: ExitStats::with_expected_cpuid_exits(expected_cpuid_exits),
            ..Default::default()
        };
        let watchdog = Watchdog::arm(timeout)?;
        self.vcpu.watch_deadline(watchdog.fired_flag());
        stats.setup = self.created.elapsed();
        let started = Instant::now();
        let result = self.run_loop(handler, &watchdog, &mut stats, trace, counter);
        stats.run = started.elapsed();
        trace.finished(self);
        result.map(|()| stats)
    }

    fn run_loop<T: trace::ExitTrace>(
        &mut self,
        handler: &mut dyn ExitHandler,
        watchdog: &Watchdog,
        stats: &mut RunStats,
        trace: &mut T,
        counter: Option<(&counter::CounterControl, CounterEvasion)>,
    ) -> Result<(), VmError> {
        let pausing = counter.filter(|(_, evasion)| evasion.pause || evasion.share_offset);
        loop {
            if watchdog.fired() {
                return Err(VmError::GuestHung {
                    timeout: watchdog.timeout,
                    rip: self.rip(),
                    place: None,
                });
            }
            trace.entering();
            let exit = self.vcpu.run()?;
            let exit_tsc = guest_payload::timing::read_tsc();
            trace.exited(&exit, exit_tsc);
            // An evader stops the counter for the whole of the exit it handles.
            // The watchdog's own kick is no exit to handle: the loop reports the hang.
            let paused = match pausing {
                Some((control, _))
                    if !watchdog.fired()
                        && !matches!(
                            exit,
                            Exit::IoOut {
                                port: guest_payload::ports::DONE,
                                ..
                            }
                        ) =>
                {
                    control.pause(|| watchdog.fired())?;
                    Some(control)
                }
                _ => None,
            };
            let flow = trace
                .handle(&mut self.vcpu, |vcpu| handler.handle(vcpu, &exit, exit_tsc))
                .map_err(VmError::Handler);
            trace.flushing();
            let flushed = self.vcpu.flush();
            let moved = self.vcpu.take_moved();
            if let Some(control) = paused {
                let share = pausing.is_some_and(|(_, evasion)| evasion.share_offset);
                control.resume(if share { moved } else { 0 });
            }
            let flow = flow?;
            flushed?;
            trace.handled(match flow {
                Flow::Continue(kind) => Some(kind),
                Flow::Done { .. } => Some(ExitKind::Done),
                Flow::Fatal => None,
            });
            match flow {
                Flow::Continue(kind) => stats
                    .exits
                    .record(kind, guest_payload::timing::read_tsc().saturating_sub(exit_tsc)),
                Flow::Done { status } => {
                    stats.exits.record(
                        ExitKind::Done,
                        guest_payload::timing::read_tsc().saturating_sub(exit_tsc),
                    );
                    return match Status::from_u32(status) {
                        Some(Status::Ok) => Ok(()),
                        _ => Err(VmError::GuestStatus { value: status }),
                    };
                }
                Flow::Fatal => return Err(self.fatal(exit)),
            }
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
            Exit::InternalError { suberror } => VmError::InternalError {
                what: internal_error_name(suberror),
                rip,
                instruction: rip.0.and_then(|rip| self.instruction_at(rip)),
            },
            Exit::FailEntry(reason) => VmError::FailEntry { reason, rip },
            Exit::Other(what) => VmError::UnexpectedExit { what, rip },
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
    pub fn results(&self) -> Result<GuestResults, VmError> {
        let memory = self.vcpu.memory();
        let base = self.config.result_addr;
        parse_results(&self.config, |offset, len| {
            let addr = base
                .checked_add(offset)
                .ok_or(VmError::BadResults("a sample offset overflows"))?;
            Ok(memory::read(memory, addr, len)?)
        })
    }
}

/// A payload's own verdict, as it reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct PayloadVerdictReport {
    pub verdict: guest_payload::PayloadVerdict,
    pub score: f64,
    /// Its reason, with anything but printable ASCII shown escaped.
    pub reason: String,
}

/// Parses a result block, wherever it lives (guest memory, a native twin's file): `read`
/// returns `len` bytes at `offset` from the block's start. A payload reports the probes
/// and samples it measured (a detector measures what it measures: the timing core is held
/// to exactly what was asked elsewhere), never more than the area the VMM gave it.
pub fn parse_results(
    config: &Config,
    read: impl Fn(u64, usize) -> Result<Vec<u8>, VmError>,
) -> Result<GuestResults, VmError> {
    let header_bytes = read(0, std::mem::size_of::<ResultHeader>())?;
    let header = ResultHeader::from_bytes(&header_bytes).ok_or(VmError::BadResults("too short"))?;
    if header.magic != RESULT_MAGIC {
        return Err(VmError::BadResults("the guest never wrote its magic"));
    }
    if header.abi_version != ABI_VERSION {
        return Err(VmError::BadResults("the guest speaks another ABI version"));
    }
    if header.probes & !guest_payload::Probe::ALL.iter().fold(0, |all, p| all | p.bit()) != 0 {
        return Err(VmError::BadResults("the guest reported a probe this VMM does not know"));
    }
    // Tick counts follow the samples only where the guest says so (a payload of its own
    // may run with a counter and report TSC samples alone).
    if header.ticks != 0 && config.counter_addr == 0 {
        return Err(VmError::BadResults(
            "the guest reported counter ticks and the run has no counter",
        ));
    }
    let reported = Config {
        probes: header.probes,
        iterations: header.iterations,
        counter_addr: if header.ticks != 0 { config.counter_addr } else { 0 },
        ..*config
    };
    if reported.result_bytes_needed() > config.result_capacity {
        return Err(VmError::BadResults(
            "the guest reported more samples than its result area holds",
        ));
    }
    let read_samples = |offset: u64| -> Result<Vec<Cycles>, VmError> {
        let bytes = read(offset, header.iterations as usize * std::mem::size_of::<Cycles>())?;
        Ok(bytes
            .chunks_exact(std::mem::size_of::<Cycles>())
            .map(|c| Cycles::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    };
    let mut results = GuestResults::default();
    for probe in guest_payload::probes_in(header.probes) {
        let offset = header
            .sample_offset(probe)
            .ok_or(VmError::BadResults("a probe without samples"))?;
        results.samples.insert(probe, read_samples(offset)?);
        if let Some(offset) = header.tick_offset(probe) {
            results.ticks.insert(probe, read_samples(offset)?);
        }
    }
    if header.ticks != 0 && header.rate_ticks != 0 {
        results.counter_rate = Some((header.rate_cycles, header.rate_ticks));
    }
    let count = (header.cpuid_count as usize).min(header.cpuid.len());
    results.cpuid = header.cpuid[..count].to_vec();
    if header.site_bytes_valid != 0 {
        let sites = guest_payload::timing::CPUID_SITE_SYMBOLS.len();
        results.site_bytes = header.site_bytes[..sites].to_vec();
    }
    results.verdict = match guest_payload::PayloadVerdict::from_u32(header.verdict) {
        Some(guest_payload::PayloadVerdict::None) => None,
        Some(verdict) => Some(PayloadVerdictReport {
            verdict,
            score: header.score_milli as f64 / 1000.0,
            reason: header.reason_text().escape_ascii().to_string(),
        }),
        None => {
            return Err(VmError::BadResults(
                "the guest reported a verdict this VMM does not know",
            ))
        }
    };
    Ok(results)
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
