//! One measurement: the timing core run once on one path, natively or in a fresh VM.
//!
//! A [`Measurer`] holds what a process learns once (the KVM context, which traps this KVM
//! delivers, whether it honours TSC moves), so a `validate` of thousands of runs probes
//! each thing once, not per run.

use crate::busy::Busy;
use crate::modes::hw_assist::HwAssist;
use crate::modes::paravirt::Paravirt;
use crate::modes::trap_emulate::{self, Trap, TrapDelivery, TrapEmulate};
use crate::modes::{CpuidExitHandler, ModeError, ModeExits, Path};
use crate::native::{self, NativeError};
use crate::shaping::calibration::{self, ShapingOutcome};
use crate::shaping::{ShapedExits, Shaper, Shaping, ShapingError};
use crate::vm::exits::{ExitKind, ExitStats};
use crate::vm::kvm::{KvmContext, KvmError};
use crate::vm::loader::{Payload, PayloadSource};
use crate::vm::trace::{ExitTrace, NoTrace};
use crate::vm::tsc::TscMethod;
use crate::vm::vcpu::RegisterAccess;
use crate::vm::{GuestVm, PayloadVerdictReport, ProbeSamples, VmError};
use guest_payload::timing::{CPUID_QUERY_SITE_SYMBOL, HYPERCALL_QUERY_SITE_SYMBOL};
use guest_payload::{flags, ports, Config, CpuidRecord, Probe, ABI_VERSION, CONFIG_MAGIC};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

pub use crate::limits::MAX_ITERATIONS;

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Evasion(#[from] crate::shaping::evasion::EvasionError),
    #[error("probe {0} reads the counter vCPU: add --vcpus 2")]
    ProbeNeedsCounter(&'static str),
    #[error(
        "the payload {payload} ({name}) reads the counter vCPU's clock (it declares VMM_CAP_COUNTER): add --vcpus 2"
    )]
    PayloadNeedsCounter { payload: String, name: String },
    #[error("iterations must be between 1 and {MAX_ITERATIONS}, not {0}")]
    Iterations(u64),
    #[error(
        "--mode native runs a payload's native twin, and {payload} has none: no executable {twin}. \
         Build it with the SDK (`make` builds NAME.elf and NAME.native side by side; docs/sdk.md)"
    )]
    NoNativeTwin { payload: String, twin: String },
    #[error("the payload {payload} declares ABI version {found} (vmm_payload_info); this vmm speaks ABI {ABI_VERSION}: rebuild it with this SDK")]
    PayloadAbi { payload: String, found: u32 },
    #[error("the payload {payload} has a vmm_payload_info whose magic is {found:#x}, not {:#x}: not the SDK's declaration (a symbol of that name from elsewhere, or a damaged file)", guest_payload::PAYLOAD_INFO_MAGIC)]
    PayloadInfoMagic { payload: String, found: u64 },
    #[error(
        "the payload {payload} ({name}) does not declare {what} in vmm_payload_info, so --mode {mode} cannot run it"
    )]
    PayloadCannot {
        payload: String,
        name: String,
        what: &'static str,
        mode: &'static str,
    },
    #[error(
        "the payload {payload} ({name}) executes rdtscp (VMM_CAP_RDTSCP), and this KVM cannot run rdtscp in a guest: \
         a probe VM of `rdtscp` alone stopped there ({why}). Run it on a KVM with VT-x/AMD-V (hardware or nested), \
         which runs rdtscp in its guests"
    )]
    RdtscpUnavailable { payload: String, name: String, why: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    CpuLock(#[from] crate::cpu_lock::CpuLockError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Shaping(#[from] ShapingError),
    #[error("cannot start the --busy threads: {0}")]
    Busy(std::io::Error),
}

impl MeasureError {
    /// "This host, or this payload, cannot take that path", known before anything was
    /// measured: `validate` and `compare` report it as refused, not as a failed run.
    pub fn is_refusal(&self) -> bool {
        let mode_refusal = |error: &ModeError| {
            matches!(
                error,
                ModeError::TrapUnavailable { .. } | ModeError::TooManySites { .. } | ModeError::NoCpuidSites
            )
        };
        match self {
            MeasureError::Kvm(_)
            | MeasureError::Shaping(_)
            | MeasureError::NoNativeTwin { .. }
            | MeasureError::PayloadAbi { .. }
            | MeasureError::PayloadInfoMagic { .. }
            | MeasureError::PayloadCannot { .. }
            | MeasureError::Evasion(_)
            | MeasureError::ProbeNeedsCounter(_)
            | MeasureError::PayloadNeedsCounter { .. }
            | MeasureError::Vm(VmError::NoCounterCpu { .. })
            | MeasureError::RdtscpUnavailable { .. } => true,
            MeasureError::Mode(error) => mode_refusal(error),
            MeasureError::Vm(VmError::Handler(error)) => error.downcast_ref::<ModeError>().is_some_and(mode_refusal),
            _ => false,
        }
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub path: Path,
    pub shaping: Shaping,
    pub iterations: u32,
    pub warmup: u32,
    pub cpuid_leaf: u32,
    pub cpuid_subleaf: u32,
    /// Bits of `Probe::bit`.
    pub probes: u32,
    /// Extra bits of `guest_payload::flags` (a deliberate hang or fault).
    pub guest_flags: u32,
    /// Record CPUID leaves and the CPUID sites' bytes as the guest sees them (the
    /// non-timing signals of the detector). Its CPUIDs are counted apart from the probe's.
    pub snapshot: bool,
    pub timeout: Duration,
    /// Host CPU for the native runner.
    pub cpu: Option<usize>,
    /// Host threads burning CPU while the run measures.
    pub busy: usize,
    /// Benches only: trapped CPUIDs and hypercalls are stepped over, never answered nor
    /// shaped — the bare round trip of each exit kind, the floor of its path.
    pub bare_exits: bool,
    /// A second vCPU spinning a counter in shared memory (natively, a host thread).
    pub counter: bool,
    pub evasions: crate::shaping::evasion::Evasions,
}

/// The probes a run takes unless told otherwise: all but those that need the counter
/// and the XOR loop; with a counter, the TIMER pair and the cross-vCPU TSC too.
pub fn default_probes(counter: bool) -> u32 {
    let base = [
        Probe::CpuidUnfenced,
        Probe::Cpuid,
        Probe::Nop,
        Probe::Rdtsc,
        Probe::Lfence8,
    ];
    let with_counter = [Probe::TimerCpuid, Probe::TimerLfence8, Probe::CrossTsc];
    let mut bits: u32 = base.iter().map(|p| p.bit()).sum();
    if counter {
        bits |= with_counter.iter().map(|p| p.bit()).sum::<u32>();
    }
    bits
}

impl RunSpec {
    pub fn new(path: Path) -> Self {
        Self {
            path,
            shaping: Shaping::None,
            iterations: 10_000,
            warmup: 100,
            cpuid_leaf: 0,
            cpuid_subleaf: 0,
            probes: default_probes(false),
            guest_flags: 0,
            snapshot: true,
            timeout: Duration::from_secs(60),
            cpu: None,
            busy: 0,
            bare_exits: false,
            counter: false,
            evasions: Default::default(),
        }
    }

    /// The config block this spec becomes.
    pub fn guest_config(&self) -> Config {
        let paravirt = if self.path == Path::Paravirt {
            flags::PARAVIRT_CPUID
        } else {
            0
        };
        Config {
            magic: CONFIG_MAGIC,
            abi_version: ABI_VERSION,
            flags: self.guest_flags | paravirt | if self.snapshot { flags::CPUID_SNAPSHOT } else { 0 },
            iterations: self.iterations,
            warmup: self.warmup,
            probes: self.probes,
            cpuid_leaf: self.cpuid_leaf,
            cpuid_subleaf: self.cpuid_subleaf,
            counter_addr: if self.counter {
                guest_payload::layout::COUNTER_BLOCK_ADDR
            } else {
                0
            },
            ..Default::default()
        }
    }

    /// A short run of the CPUID probe alone, for probes and calibration.
    pub fn cpuid_only(&self, iterations: u32, warmup: u32, shaping: Shaping) -> Self {
        Self {
            snapshot: false,
            shaping,
            iterations,
            warmup,
            probes: Probe::Cpuid.bit(),
            guest_flags: 0,
            busy: 0,
            ..self.clone()
        }
    }

    /// CPUID exits the built-in timing core takes (`Config::timing_core_cpuids`).
    pub fn expected_cpuid_exits(&self) -> usize {
        usize::try_from(self.guest_config().timing_core_cpuids()).unwrap_or(usize::MAX)
    }

    fn measures_cpuid(&self) -> bool {
        self.probes & Probe::Cpuid.bit() != 0 && self.guest_flags == 0
    }
}

/// What one run measured, whatever the path.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub samples: ProbeSamples,
    /// Counter ticks over each sample (runs with a counter).
    pub ticks: ProbeSamples,
    /// TSC cycles and counter ticks over the rate window (runs with a counter).
    pub counter_rate: Option<(u64, u64)>,
    /// What the counter vCPU went through (VM runs with a counter).
    pub counter: Option<crate::vm::CounterStats>,
    pub cpuid: Vec<CpuidRecord>,
    /// The CPUID sites' bytes as the measured code read them.
    pub site_bytes: Vec<[u8; 2]>,
    pub exits: ExitStats,
    /// VM creation to the first KVM_RUN (VM modes only).
    pub setup: Option<Duration>,
    pub run: Duration,
    /// How registers travelled at each exit (VM modes only).
    pub register_access: Option<RegisterAccess>,
    /// The host CPU the native runner was pinned to.
    pub native_cpu: Option<usize>,
    /// The payload's own verdict, where it reported one.
    pub verdict: Option<PayloadVerdictReport>,
    /// How trap-emulate's traps arrived.
    pub trap_delivery: Option<TrapDelivery>,
    pub shaping: Option<ShapingOutcome>,
    /// What the shaper did at each CPUID exit.
    pub shaped: ShapedExits,
    /// How the run moved the guest TSC, where it did.
    pub tsc_method: Option<TscMethod>,
}

/// Runs measurements, remembering per process what it probed.
pub struct Measurer {
    kvm: Result<KvmContext, KvmError>,
    /// Trap deliveries found by probing, per payload and trap.
    traps: RefCell<HashMap<(String, Trap), TrapDelivery>>,
    /// TSC move methods found to work, per payload and path.
    tsc_moves: RefCell<HashMap<(String, Path), TscMethod>>,
    /// Whether a guest can run `rdtscp` here (`Err`: why not), once probed.
    rdtscp: RefCell<Option<Result<(), String>>>,
    /// The host CPUs this process times on, locked against other vmm processes.
    cpu_locks: RefCell<crate::cpu_lock::CpuLocks>,
}

/// Trapped CPUIDs that spend the burst of Linux's default printk rate limit (10 messages
/// per 5 s, `DEFAULT_RATELIMIT_BURST`), with room to spare.
const TRAP_LOG_BURST: u32 = 16;

/// What distinguishes one payload from another for probes.
fn payload_key(payload: &Payload) -> String {
    format!("{}@{:#x}", payload.source, payload.entry)
}

impl Measurer {
    /// Opens /dev/kvm where it is there (only VM paths need it, when they run).
    pub fn open() -> Self {
        Self::with_kvm(KvmContext::open())
    }

    pub fn with_kvm(kvm: Result<KvmContext, KvmError>) -> Self {
        Self {
            kvm,
            traps: RefCell::default(),
            tsc_moves: RefCell::default(),
            rdtscp: RefCell::default(),
            cpu_locks: RefCell::default(),
        }
    }

    /// The config with the TSC rate the payload may use to turn time into cycles.
    fn with_tsc_rate(&self, config: Config) -> Config {
        let khz = self.kvm.as_ref().ok().and_then(|k| k.tsc_khz);
        Config {
            tsc_khz: khz.unwrap_or_else(|| crate::host::tsc_frequency(None).khz),
            ..config
        }
    }

    /// The KVM context, or why there is none.
    pub fn kvm(&self) -> Result<&KvmContext, MeasureError> {
        self.kvm.as_ref().map_err(|error| match error {
            KvmError::Open(e) => MeasureError::Kvm(KvmError::Open(*e)),
            KvmError::SupportedCpuid(e) => MeasureError::Kvm(KvmError::SupportedCpuid(*e)),
        })
    }

    /// Runs `spec` once, with the probes and calibration its path and shaping need.
    pub fn measure(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        console: Option<&mut (dyn Write + Send)>,
    ) -> Result<Measurement, MeasureError> {
        self.measure_traced(payload, spec, console, &mut NoTrace)
    }

    /// [`Measurer::measure`], telling `trace` about every exit of the measured run (not of
    /// its probes and calibration rounds).
    pub fn measure_traced<T: ExitTrace>(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        console: Option<&mut (dyn Write + Send)>,
        trace: &mut T,
    ) -> Result<Measurement, MeasureError> {
        if spec.iterations == 0 || spec.iterations > MAX_ITERATIONS {
            return Err(MeasureError::Iterations(u64::from(spec.iterations)));
        }
        if spec.shaping != Shaping::None && !spec.path.vmm_handles_cpuid() {
            return Err(ShapingError::NeedsVmmExits(spec.shaping.kind()).into());
        }
        if spec.shaping != Shaping::None && spec.probes & Probe::Cpuid.bit() == 0 {
            return Err(ShapingError::NeedsCpuidProbe(spec.shaping.kind()).into());
        }
        preflight(payload, spec)?;
        if let Some(probe) = guest_payload::probes_in(spec.probes).find(|p| p.needs_counter() && !spec.counter) {
            return Err(MeasureError::ProbeNeedsCounter(probe.name()));
        }
        let tsc_control = match (spec.path, self.kvm()) {
            (Path::Native, _) => Err("native: no KVM"),
            (_, Ok(kvm)) if kvm.tsc_control => Ok(()),
            _ => Err(crate::host::kvm_flavour().0.describe()),
        };
        spec.evasions.check(
            spec.counter,
            spec.path.vmm_handles_cpuid(),
            spec.shaping.moves_tsc(),
            tsc_control,
        )?;
        // Refused only where the payload would execute it: the guest's CPUID advertises
        // RDTSCP and this KVM still fails on it. Where the CPUID says "no RDTSCP", the
        // payload runs and answers for itself (VMAware 2.6 calls that a VM).
        if spec.path != Path::Native
            && payload.declares(guest_payload::capabilities::RDTSCP)
            && self.kvm()?.guest_advertises_rdtscp()
        {
            self.rdtscp_in_guest()?.map_err(|why| MeasureError::RdtscpUnavailable {
                payload: payload.source.to_string(),
                name: declared_name(payload),
                why,
            })?;
        }
        // One timing CPU per run across processes: taken before anything is timed, held
        // until this process ends.
        let timing_cpu = self.lock_timing_cpus(spec)?;
        let spec = &RunSpec {
            cpu: Some(timing_cpu),
            ..spec.clone()
        };
        // Started before anything is measured and stopped (on drop) after everything is.
        let _busy = Busy::start(spec.busy).map_err(MeasureError::Busy)?;
        if spec.path == Path::Native {
            let config = self.with_tsc_rate(spec.guest_config());
            let run = match native_twin(payload)? {
                None => native::run(&config, spec.cpu, spec.timeout)?,
                Some(twin) => native::run_twin(&twin, &config, spec.cpu, spec.timeout, console)?,
            };
            return Ok(Measurement {
                samples: run.samples,
                ticks: run.ticks,
                counter_rate: run.counter_rate,
                cpuid: run.cpuid,
                site_bytes: run.site_bytes,
                verdict: run.verdict,
                run: run.run,
                native_cpu: Some(run.cpu),
                ..Default::default()
            });
        }
        self.kvm()?;
        let trap_delivery = match spec.path.trap() {
            Some(trap) => Some(self.probe_trap(spec, trap)?),
            None => None,
        };
        // An emulating KVM logs each trap of an int3 patch (an emulation failure) to the
        // kernel log, rate-limited to a burst per interval: the burst's traps cost ~10^6
        // cycles each. Calibration rounds spend it before a shaped run; an unshaped run
        // spends it here, not on its first samples (docs/trap-emulate.md).
        if trap_delivery == Some(TrapDelivery::EmulationFailure) && spec.shaping == Shaping::None {
            self.spend_trap_log_burst(spec)?;
        }
        let (shaper, shaping) = match spec.shaping {
            Shaping::None => (Shaper::none(), None),
            _ => {
                let (shaper, outcome) = calibration::prepare(self, spec)?;
                (shaper, Some(outcome))
            }
        };
        let mut measurement = self.run_vm_traced(payload, spec, shaper, console, trace)?;
        measurement.trap_delivery = measurement.trap_delivery.or(trap_delivery);
        measurement.shaping = match shaping {
            Some(outcome) => Some(ShapingOutcome {
                after: Some(calibration::rounds(self, spec)?),
                ..outcome
            }),
            None => None,
        };
        Ok(measurement)
    }

    /// One VM run of `spec` with the handler its path needs; no probe, no calibration.
    pub fn run_vm(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        shaper: Shaper,
        console: Option<&mut (dyn Write + Send)>,
    ) -> Result<Measurement, MeasureError> {
        self.run_vm_traced(payload, spec, shaper, console, &mut NoTrace)
    }

    fn run_vm_traced<T: ExitTrace>(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        shaper: Shaper,
        console: Option<&mut (dyn Write + Send)>,
        trace: &mut T,
    ) -> Result<Measurement, MeasureError> {
        let mut vm = GuestVm::create(self.kvm()?, payload, &self.with_tsc_rate(spec.guest_config()))?;
        if let Some(cpu) = spec.cpu {
            vm.pin_to(cpu);
        }
        // Sized before the run: no reallocation inside an exit hide must account for.
        let mut shaper = shaper;
        shaper.reserve(spec.expected_cpuid_exits());
        vm.set_counter_evasion(crate::vm::CounterEvasion {
            pause: spec.evasions.pause_counter,
            share_offset: spec.evasions.shared_offset,
        })?;
        if let Some(khz) = spec.evasions.tsc_khz {
            vm.set_tsc_khz(khz)?;
        }
        let cpuid = vm.cpuid_table().clone();
        let mut handler = match spec.path {
            Path::Native | Path::HwAssist => PathHandler::HwAssist(HwAssist),
            Path::TrapEmulate(trap) => {
                let handler = TrapEmulate::new(
                    trap,
                    payload.cpuid_sites.clone(),
                    payload.symbol(CPUID_QUERY_SITE_SYMBOL),
                    cpuid,
                    shaper,
                );
                PathHandler::Trap(if spec.bare_exits { handler.bare() } else { handler })
            }
            Path::Paravirt => {
                let handler = Paravirt::new(cpuid, payload.symbol(HYPERCALL_QUERY_SITE_SYMBOL), shaper);
                PathHandler::Paravirt(if spec.bare_exits { handler.bare() } else { handler })
            }
        };
        let stats = vm
            .run_traced(
                &mut ModeExits {
                    mode: handler.as_dyn(),
                    console,
                },
                spec.timeout,
                trace,
            )
            .map_err(|e| e.placed_in(payload))?;
        let results = vm.results()?;
        check_timing_core(payload, spec, &results.samples)?;
        let trap_delivery = match &handler {
            PathHandler::Trap(trap) => trap.delivery,
            _ => None,
        };
        let shaper = handler.as_dyn().shaper();
        let measurement = Measurement {
            samples: results.samples,
            ticks: results.ticks,
            counter_rate: results.counter_rate,
            counter: stats.counter,
            cpuid: results.cpuid,
            site_bytes: results.site_bytes,
            verdict: results.verdict,
            exits: stats.exits,
            setup: Some(stats.setup),
            run: stats.run,
            register_access: Some(vm.register_access()),
            shaped: shaper.map(|s| s.exits().clone()).unwrap_or_default(),
            tsc_method: shaper.and_then(Shaper::tsc_method),
            trap_delivery,
            ..Default::default()
        };
        check_path_was_taken(spec, &measurement.exits)?;
        Ok(measurement)
    }

    /// Does this KVM deliver the trap at all? One CPUID of the embedded timing core,
    /// trapped, finds out (once per trap): a CPUID that is known to execute, so that a
    /// payload whose sites never run is not taken for a KVM that drops traps (its own run
    /// then says that none of its CPUIDs trapped). A failure elsewhere is itself.
    pub fn probe_trap(&self, spec: &RunSpec, trap: Trap) -> Result<TrapDelivery, MeasureError> {
        let payload = &Payload::embedded().map_err(VmError::from)?;
        let key = (payload_key(payload), trap);
        if let Some(delivery) = self.traps.borrow().get(&key) {
            return Ok(*delivery);
        }
        let probe = RunSpec {
            bare_exits: false,
            cpuid_leaf: 0,
            cpuid_subleaf: 0,
            ..spec.cpuid_only(1, 0, Shaping::None)
        };
        // At the site itself (an int3 may report the byte after it), never the instruction
        // after: `cpuid; rdtscp` failing on the rdtscp is the payload's own doing.
        let sites = &payload.cpuid_sites;
        let at_a_site = |error: &VmError| {
            error.rip().is_some_and(|rip| {
                sites
                    .iter()
                    .any(|&site| rip == site || (trap == Trap::Int3Patch && rip == site + 1))
            })
        };
        let unavailable = |why: String| MeasureError::Mode(ModeError::TrapUnavailable { trap: trap.name(), why });
        const NO_TRAP: &str = "the guest's CPUID ran to completion without a single trap exit (breakpoints armed with KVM_SET_GUEST_DEBUG do not fire)";
        let delivery = match self.run_vm(payload, &probe, Shaper::none(), None) {
            Ok(measured) => measured.trap_delivery.ok_or_else(|| unavailable(NO_TRAP.into()))?,
            Err(MeasureError::Mode(ModeError::NoTraps { .. })) => return Err(unavailable(NO_TRAP.into())),
            Err(MeasureError::Vm(error @ (VmError::TripleFault { .. } | VmError::InternalError { .. }))) => {
                // Blame the trap only if the trap is what broke the run: at a trapped site,
                // or (a triple fault resets RIP) where the same run without the trap
                // completes.
                let untrapped = RunSpec {
                    path: Path::HwAssist,
                    ..probe.clone()
                };
                if at_a_site(&error) || self.run_vm(payload, &untrapped, Shaper::none(), None).is_ok() {
                    return Err(unavailable(format!(
                        "with the trap armed the guest stopped ({error}), and without it the same code runs"
                    )));
                }
                return Err(MeasureError::Vm(error));
            }
            Err(other) => return Err(other),
        };
        self.traps.borrow_mut().insert(key, delivery);
        Ok(delivery)
    }

    /// Can a guest run `rdtscp` on this KVM? A VM of `rdtscp; out done` finds out, once
    /// per process: `Ok(Err(why))` when the guest stopped at the rdtscp (an emulating KVM
    /// may advertise RDTSCP in CPUID and still fail on it), `Err` when the probe itself
    /// could not run (that is not remembered: it says nothing of rdtscp).
    pub fn rdtscp_in_guest(&self) -> Result<Result<(), String>, MeasureError> {
        if let Some(known) = self.rdtscp.borrow().as_ref() {
            return Ok(known.clone());
        }
        // rdtscp; xor eax, eax; out 0xf4, eax (done, status ok); hlt
        const CODE: [u8; 8] = [0x0f, 0x01, 0xf9, 0x31, 0xc0, 0xe7, ports::DONE as u8, 0xf4];
        let outcome = self.runs_in_guest("rdtscp probe", &CODE)?;
        *self.rdtscp.borrow_mut() = Some(outcome.clone());
        Ok(outcome)
    }

    /// The CPU `spec` times on, its lock taken under the process's `--cpu-lock` policy
    /// (and the counter's CPU, for a run with a counter): `--cpu`, else one this process
    /// already holds, else the last allowed CPU that no other vmm process holds, else the
    /// last allowed one (waited for, or refused).
    fn lock_timing_cpus(&self, spec: &RunSpec) -> Result<usize, MeasureError> {
        let allowed = native::allowed_cpus();
        let policy = crate::cpu_lock::policy();
        let mut locks = self.cpu_locks.borrow_mut();
        let last = *allowed.last().unwrap_or(&0);
        let timing = match spec.cpu {
            Some(cpu) if !allowed.contains(&cpu) => {
                return Err(native::NativeError::CpuNotAllowed { cpu, allowed }.into());
            }
            Some(cpu) => cpu,
            None => match allowed.iter().rev().find(|&&c| locks.holds(c)) {
                Some(&held) => held,
                None if policy == crate::cpu_lock::CpuLockPolicy::Off => last,
                None => {
                    let mut free = None;
                    for &cpu in allowed.iter().rev() {
                        if locks.try_take(cpu)? {
                            free = Some(cpu);
                            break;
                        }
                    }
                    free.unwrap_or(last)
                }
            },
        };
        let interrupted = || crate::interrupt::caught().is_some();
        let mut say = |line: &str| eprintln!("{line}");
        locks.take(timing, policy, &interrupted, &mut say)?;
        if spec.counter {
            // The counter's CPU, chosen as the VM and the native runner choose it.
            if let Some(other) = allowed.iter().copied().find(|&c| c != timing) {
                locks.take(other, policy, &interrupted, &mut say)?;
            }
        }
        Ok(timing)
    }

    /// Runs the embedded core on `spec`'s path for [`TRAP_LOG_BURST`] trapped CPUIDs and
    /// more, so that the kernel's rate-limited log of emulation failures has spent its
    /// burst before the measured run begins.
    fn spend_trap_log_burst(&self, spec: &RunSpec) -> Result<(), MeasureError> {
        let payload = Payload::embedded().map_err(VmError::from)?;
        let warm = RunSpec {
            bare_exits: false,
            ..spec.cpuid_only(TRAP_LOG_BURST, 0, Shaping::None)
        };
        self.run_vm(&payload, &warm, Shaper::none(), None).map(drop)
    }

    /// Can a guest compute in floating point here (SSE arithmetic, what a compiler emits
    /// for `double`)? An emulating KVM runs SSE moves but no SSE or x87 arithmetic.
    pub fn float_in_guest(&self) -> Result<Result<(), String>, MeasureError> {
        // cvtsi2sd xmm0, eax; divsd xmm0, xmm0; xor eax, eax; out 0xf4, eax; hlt
        const CODE: [u8; 14] = [
            0xf2,
            0x0f,
            0x2a,
            0xc0,
            0xf2,
            0x0f,
            0x5e,
            0xc0,
            0x31,
            0xc0,
            0xe7,
            ports::DONE as u8,
            0xf4,
            0xf4,
        ];
        self.runs_in_guest("floating-point probe", &CODE)
    }

    /// Runs `code` as a guest (hw-assist): `Err(why)` where KVM could not run one of its
    /// instructions; any other failure is the probe's own.
    fn runs_in_guest(&self, what: &'static str, code: &[u8]) -> Result<Result<(), String>, MeasureError> {
        let probe = Payload::generated(what, code).map_err(VmError::from)?;
        let config = self.with_tsc_rate(
            RunSpec::new(Path::HwAssist)
                .cpuid_only(1, 0, Shaping::None)
                .guest_config(),
        );
        let mut vm = GuestVm::create(self.kvm()?, &probe, &config)?;
        let handler = &mut ModeExits {
            mode: &mut HwAssist,
            console: None,
        };
        let end = probe.entry + code.len() as u64;
        match vm.run(handler, Duration::from_secs(5)) {
            Ok(_) => Ok(Ok(())),
            Err(error @ (VmError::InternalError { .. } | VmError::TripleFault { .. }))
                if error.rip().is_some_and(|rip| (probe.entry..end).contains(&rip)) =>
            {
                Ok(Err(error.to_string()))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// The TSC move method already found to work for this payload and path.
    pub(crate) fn known_tsc_method(&self, payload: &Payload, path: Path) -> Option<TscMethod> {
        self.tsc_moves.borrow().get(&(payload_key(payload), path)).copied()
    }

    pub(crate) fn remember_tsc_method(&self, payload: &Payload, path: Path, method: TscMethod) {
        self.tsc_moves.borrow_mut().insert((payload_key(payload), path), method);
    }
}

/// Everything that refuses `spec` for `payload` without running anything: what the payload
/// declares, a native twin where one is needed, sites the trap can take. `inspect` asks
/// the same for every path.
pub fn preflight(payload: &Payload, spec: &RunSpec) -> Result<(), MeasureError> {
    check_declaration(payload, spec)?;
    match spec.path {
        Path::Native => native_twin(payload).map(|_| ()),
        Path::TrapEmulate(trap) => Ok(trap_emulate::check_sites(trap, payload.cpuid_sites.len())?),
        Path::HwAssist | Path::Paravirt => Ok(()),
    }
}

/// The native twin a native run of `payload` executes; `None` for the embedded timing
/// core, which runs in a host thread of this process.
pub fn native_twin(payload: &Payload) -> Result<Option<std::path::PathBuf>, MeasureError> {
    match &payload.source {
        PayloadSource::Embedded => Ok(None),
        PayloadSource::Generated(what) => Err(MeasureError::NoNativeTwin {
            payload: (*what).to_owned(),
            twin: "(a generated probe has none)".to_owned(),
        }),
        PayloadSource::File(path) => {
            let twin = native::twin_of(path);
            if !twin.is_file() {
                return Err(MeasureError::NoNativeTwin {
                    payload: path.display().to_string(),
                    twin: twin.display().to_string(),
                });
            }
            Ok(Some(twin))
        }
    }
}

/// The name a payload declares, for messages.
fn declared_name(payload: &Payload) -> String {
    payload.declared_name().unwrap_or_else(|| "declares nothing".to_owned())
}

/// What the payload declared against what the run asks of it, before anything runs. A
/// payload that declares nothing may still run where nothing is asked of it.
fn check_declaration(payload: &Payload, spec: &RunSpec) -> Result<(), MeasureError> {
    let name = declared_name(payload);
    if let Some(info) = payload.info {
        if info.magic != guest_payload::PAYLOAD_INFO_MAGIC {
            return Err(MeasureError::PayloadInfoMagic {
                payload: payload.source.to_string(),
                found: info.magic,
            });
        }
        if info.abi_version != ABI_VERSION {
            return Err(MeasureError::PayloadAbi {
                payload: payload.source.to_string(),
                found: info.abi_version,
            });
        }
    }
    if !spec.counter && payload.declares(guest_payload::capabilities::COUNTER) {
        return Err(MeasureError::PayloadNeedsCounter {
            payload: payload.source.to_string(),
            name,
        });
    }
    if spec.path == Path::Paravirt && !payload.declares(guest_payload::capabilities::PARAVIRT_CPUID) {
        return Err(MeasureError::PayloadCannot {
            payload: payload.source.to_string(),
            name,
            what: "paravirtual CPUID (VMM_CAP_PARAVIRT_CPUID)",
            mode: "paravirt",
        });
    }
    Ok(())
}

/// A payload that declares the timing core must report exactly what it was asked for.
fn check_timing_core(payload: &Payload, spec: &RunSpec, samples: &ProbeSamples) -> Result<(), VmError> {
    let declared = payload.declares(guest_payload::capabilities::TIMING_CORE);
    let complete = guest_payload::probes_in(spec.probes)
        .all(|probe| samples.get(&probe).is_some_and(|s| s.len() == spec.iterations as usize));
    if declared && (!complete || samples.len() != spec.probes.count_ones() as usize) {
        return Err(VmError::BadResults(
            "the guest measured something other than what was asked",
        ));
    }
    Ok(())
}

/// A run on a VMM path whose CPUID never reached the VMM measured something else: say so.
fn check_path_was_taken(spec: &RunSpec, exits: &ExitStats) -> Result<(), ModeError> {
    if !spec.measures_cpuid() {
        return Ok(());
    }
    match spec.path {
        Path::Paravirt if exits.count(ExitKind::CpuidHypercall) == 0 => {
            Err(ModeError::NoHypercalls { port: ports::HYPERCALL })
        }
        Path::TrapEmulate(_) if exits.count(ExitKind::CpuidTrap) == 0 => Err(ModeError::NoTraps {
            exits: exits.count(ExitKind::CpuidQueryTrap),
        }),
        _ => Ok(()),
    }
}

/// The handler of each path, owned for one run.
enum PathHandler {
    HwAssist(HwAssist),
    Trap(TrapEmulate),
    Paravirt(Paravirt),
}

impl PathHandler {
    fn as_dyn(&mut self) -> &mut dyn CpuidExitHandler {
        match self {
            PathHandler::HwAssist(h) => h,
            PathHandler::Trap(h) => h,
            PathHandler::Paravirt(h) => h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exits(kind: ExitKind, count: usize) -> ExitStats {
        let mut stats = ExitStats::default();
        for _ in 0..count {
            stats.record(kind, 1);
        }
        stats
    }

    #[test]
    fn a_vmm_path_whose_cpuid_never_reached_the_vmm_is_an_error() {
        let paravirt = RunSpec::new(Path::Paravirt);
        assert!(matches!(
            check_path_was_taken(&paravirt, &exits(ExitKind::Console, 3)),
            Err(ModeError::NoHypercalls { .. })
        ));
        assert!(check_path_was_taken(&paravirt, &exits(ExitKind::CpuidHypercall, 3)).is_ok());
        let trap = RunSpec::new(Path::TrapEmulate(Trap::IoPatch));
        assert!(matches!(
            check_path_was_taken(&trap, &exits(ExitKind::CpuidQueryTrap, 8)),
            Err(ModeError::NoTraps { exits: 8 })
        ));
        let no_cpuid_probe = RunSpec {
            probes: Probe::Nop.bit(),
            ..RunSpec::new(Path::Paravirt)
        };
        assert!(check_path_was_taken(&no_cpuid_probe, &ExitStats::default()).is_ok());
        assert!(check_path_was_taken(&RunSpec::new(Path::HwAssist), &ExitStats::default()).is_ok());
    }
}
