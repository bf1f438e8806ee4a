//! One measurement: the timing core (or a payload) run once on one path, natively or in a
//! fresh VM — and the only code that boots more than one VM or runs natively.
//!
//! A run goes through named stages, each in a file of its own:
//! 1. [`preflight`]: everything that refuses the run without running anything (the
//!    payload's declaration, a native twin, trap sites, evasions, RDTSCP), then the CPUs
//!    it times on, locked against other vmm processes;
//! 2. [`probes`]: what this KVM does, found once per process (does it deliver the trap,
//!    run rdtscp, honour TSC moves);
//! 3. [`calibration`]: for a shaped run, the unshaped cost of its path, measured before;
//! 4. [`run`]: the measured run itself, with the mode that answers CPUID and the
//!    policies that shape it;
//! 5. recalibration: the same calibration again after it, to see the host drift.
//!
//! How many VMs a run boots, so that a slow first run surprises no one: an unshaped
//! hw-assist or paravirt run boots one; trap-emulate adds one probe VM per trap and
//! process (two where the first fails, to tell the trap's fault from the payload's) and,
//! where an int3 arrives as an emulation failure, one that spends the kernel log's burst;
//! a shaped run adds [`calibration::CALIBRATION_ROUNDS`] calibration VMs before and as
//! many after, and, where it moves the TSC, one probe VM per path and process. The first
//! `trap-emulate --hide` of a process thus boots nine VMs (probe, TSC probe, three rounds,
//! the run, three rounds) and runs the core natively once (the native target); a later
//! one in the same process seven. A native run boots none.
//!
//! A [`Measurer`] holds what a process learns once (the KVM context, which traps this KVM
//! delivers, whether it honours TSC moves), so a `validate` of thousands of runs probes
//! each thing once, not per run.

pub mod calibration;
pub mod preflight;
pub mod probes;
pub mod run;

use crate::busy::Busy;
use crate::host::{AffinityError, Placement};
use crate::modes::trap_emulate::{Trap, TrapDelivery};
use crate::modes::tsc_trap::TscTrapBy;
use crate::modes::{ModeError, Path};
use crate::native::{self, NativeError};
use crate::results::{Results, ResultsError};
use crate::shaping::latency::{Latency, Shaping};
use crate::shaping::outcome::ShapingOutcome;
use crate::shaping::registry::Evasions;
use crate::shaping::ShapedExits;
use crate::shaping::ShapingError;
use crate::vm::accounting::ExitStats;
use crate::vm::kvm::{KvmContext, KvmError};
use crate::vm::loader::Payload;
use crate::vm::trace::{ExitTrace, NoTrace};
use crate::vm::tsc::TscMethod;
use crate::vm::vcpu::RegisterAccess;
use crate::vm::{RunError, VmError};
use guest_payload::{flags, Config, Probe, ABI_VERSION, CONFIG_MAGIC};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

pub use crate::limits::MAX_ITERATIONS;
pub use preflight::{native_twin, preflight};

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Evasion(#[from] crate::shaping::evasion::EvasionError),
    #[error("probe {0} reads the counter vCPU, and the run has none")]
    ProbeNeedsCounter(&'static str),
    #[error(
        "the payload {payload} ({name}) reads the counter vCPU's clock (it declares VMM_CAP_COUNTER), and the run has no counter"
    )]
    PayloadNeedsCounter { payload: String, name: String },
    #[error("iterations must be between 1 and {MAX_ITERATIONS}, not {0}")]
    Iterations(u64),
    #[error(
        "a native run executes a payload's native twin, and {payload} has none: no executable {twin}. \
         Build it with the SDK (`make` builds NAME.elf and NAME.native side by side; docs/sdk.md)"
    )]
    NoNativeTwin { payload: String, twin: String },
    #[error("the payload {payload} declares ABI version {found} (vmm_payload_info); this vmm speaks ABI {ABI_VERSION}: rebuild it with this SDK")]
    PayloadAbi { payload: String, found: u32 },
    #[error("the payload {payload} has a vmm_payload_info whose magic is {found:#x}, not {:#x}: not the SDK's declaration (a symbol of that name from elsewhere, or a damaged file)", guest_payload::PAYLOAD_INFO_MAGIC)]
    PayloadInfoMagic { payload: String, found: u64 },
    #[error(
        "the payload {payload} ({name}) does not declare {what} in vmm_payload_info, so the {mode} path cannot run it"
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
    #[error("--tsc-trap {0}: no evasion of this run traps RDTSC or RDTSCP (give one that does, e.g. --evade rdtsc-trap, or leave --tsc-trap out)")]
    TscTrapUnused(&'static str),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Affinity(#[from] AffinityError),
    #[error(transparent)]
    CpuLock(#[from] crate::cpu_lock::CpuLockError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Shaping(#[from] ShapingError),
    #[error("cannot start the busy threads: {0}")]
    Busy(std::io::Error),
}

impl MeasureError {
    /// What the run can be given instead, where something can: the command layer spells
    /// it as a flag or a matrix field.
    pub fn remedy(&self) -> Option<crate::remedy::Remedy> {
        use crate::remedy::Remedy;
        match self {
            MeasureError::Evasion(error) => error.remedy(),
            MeasureError::ProbeNeedsCounter(_) | MeasureError::PayloadNeedsCounter { .. } => Some(Remedy::TwoVcpus),
            MeasureError::Mode(error) => error.remedy(),
            MeasureError::Shaping(error) => error.remedy(),
            MeasureError::Vm(VmError::GuestHung { .. })
            | MeasureError::Native(NativeError::PastDeadline { .. } | NativeError::TwinHung { .. }) => {
                Some(Remedy::LongerTimeout)
            }
            _ => None,
        }
    }

    /// "This host, or this payload, cannot take that path", known before anything was
    /// measured: `validate` and `compare` report it as refused, not as a failed run.
    pub fn is_refusal(&self) -> bool {
        let mode_refusal = |error: &ModeError| {
            matches!(
                error,
                ModeError::TrapUnavailable { .. }
                    | ModeError::TooManySites { .. }
                    | ModeError::NoCpuidSites
                    | ModeError::TooManyTscSites { .. }
                    | ModeError::TscBreakpointsUnavailable { .. }
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
            | MeasureError::Vm(VmError::Affinity(AffinityError::NoCounterCpu { .. }))
            | MeasureError::RdtscpUnavailable { .. } => true,
            MeasureError::Mode(error) => mode_refusal(error),
            _ => false,
        }
    }
}

impl From<RunError<ModeError>> for MeasureError {
    fn from(error: RunError<ModeError>) -> Self {
        match error {
            RunError::Vm(error) => MeasureError::Vm(error),
            RunError::Handler(error) => MeasureError::Mode(error),
        }
    }
}

impl From<ResultsError> for MeasureError {
    fn from(error: ResultsError) -> Self {
        MeasureError::Vm(VmError::Results(error))
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
    pub evasions: Evasions,
    /// How an evasion's RDTSC trap reaches the VMM (`--tsc-trap`).
    pub tsc_trap: TscTrapBy,
}

/// The probes a run takes unless told otherwise: all but those that need the counter
/// and the XOR loop; with a counter, the TIMER pair and the cross-vCPU TSC too. Not the
/// MSR window either: its CPUID is a fifth site, one more than `--trap hw-breakpoint`'s
/// four debug registers (asked for, it is trapped where the trap can).
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
    /// Why the guest's CPUID sites read patched for a reason other than the hypervisor
    /// modelled: an evasion staged on a patching trap. Each public evader traps in
    /// hardware and patches nothing; here its CPUID exits come through the testbed's patch.
    /// `None` where nothing is staged or the CPUID sites are untouched (the RDTSC trap's
    /// patches are not at CPUID sites).
    pub fn patched_for_an_evader(&self) -> Option<&'static str> {
        match self.path {
            Path::TrapEmulate(Trap::IoPatch | Trap::Int3Patch) if !self.evasions.is_none() => Some(
                "the testbed patched the CPUID sites to trap them (--trap io-patch or int3-patch), \
                 and the evasion staged on them is modelled on a hypervisor that patches nothing",
            ),
            _ => None,
        }
    }

    /// The CPUID sites this run executes: the payload's, less the embedded core's MSR
    /// window where that probe is not asked for (it never runs, and a fifth site would
    /// not fit `--trap hw-breakpoint`'s four debug registers).
    pub fn cpuid_sites(&self, payload: &Payload) -> Vec<u64> {
        let unused = if self.probes & Probe::MsrCpuid.bit() == 0 {
            payload.symbol(guest_payload::timing::CPUID_MSR_SITE_SYMBOL)
        } else {
            None
        };
        payload
            .cpuid_sites
            .iter()
            .copied()
            .filter(|&site| Some(site) != unused)
            .collect()
    }

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
            tsc_trap: TscTrapBy::IoPatch,
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
            flags: self.guest_flags | paravirt | flags::CLOCKS | if self.snapshot { flags::CPUID_SNAPSHOT } else { 0 },
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
            // These runs are of the embedded core, whose TSC reads outnumber DR0-DR3.
            tsc_trap: TscTrapBy::IoPatch,
            ..self.clone()
        }
    }

    /// CPUID exits the built-in timing core takes (`Config::timing_core_cpuids`).
    pub fn expected_cpuid_exits(&self) -> usize {
        usize::try_from(self.guest_config().timing_core_cpuids()).unwrap_or(usize::MAX)
    }

    pub(super) fn measures_cpuid(&self) -> bool {
        self.probes & Probe::Cpuid.bit() != 0 && self.guest_flags == 0
    }
}

/// What one run measured, whatever the path.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    /// What the guest (or the native runner, or a twin) reported.
    pub results: Results,
    /// What the counter vCPU went through (VM runs with a counter).
    pub counter: Option<crate::vm::CounterStats>,
    pub exits: ExitStats,
    /// VM creation to the first KVM_RUN (VM modes only).
    pub setup: Option<Duration>,
    pub run: Duration,
    /// How registers travelled at each exit (VM modes only).
    pub register_access: Option<RegisterAccess>,
    /// The host CPU the native runner was pinned to.
    pub native_cpu: Option<usize>,
    /// How trap-emulate's traps arrived.
    pub trap_delivery: Option<TrapDelivery>,
    pub shaping: Option<ShapingOutcome>,
    /// What latency shaping did at each CPUID exit.
    pub shaped: ShapedExits,
    /// How the run moved the guest TSC, where it did.
    pub tsc_method: Option<TscMethod>,
    /// What the guest's trapped TSC reads were told, where an evasion trapped them.
    pub tsc_trap: Option<crate::modes::tsc_trap::TscTrapRecord>,
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
    /// Whether this KVM takes a guest's kvmclock MSR write, once probed.
    kvmclock: RefCell<Option<bool>>,
    /// The host CPUs this process times on, locked against other vmm processes.
    cpu_locks: RefCell<crate::cpu_lock::CpuLocks>,
}

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
            kvmclock: RefCell::default(),
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
            KvmError::CpuidTable(e) => MeasureError::Kvm(KvmError::CpuidTable(e.clone())),
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
    /// its probes and calibration rounds). The stages of the module doc, in order.
    pub fn measure_traced<T: ExitTrace>(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        console: Option<&mut (dyn Write + Send)>,
        trace: &mut T,
    ) -> Result<Measurement, MeasureError> {
        // 1. Preflight: refused before anything runs; then the CPUs, locked.
        self.refuse_early(payload, spec)?;
        let placement = self.lock_placement(spec)?;
        let spec = &RunSpec {
            cpu: Some(placement.timing),
            ..spec.clone()
        };
        // Started before anything is measured and stopped (on drop) after everything is.
        let _busy = Busy::start(spec.busy).map_err(MeasureError::Busy)?;
        if spec.path == Path::Native {
            return self.run_native(payload, spec, placement, console);
        }
        // 2. Probes: what this KVM does with the path (and the RDTSC trap's breakpoints).
        let trap_delivery = self.probe_path(spec)?;
        if spec.tsc_trap == TscTrapBy::HwBreakpoint {
            self.probe_tsc_breakpoints(spec)?;
        }
        if spec.evasions.moves_offset() {
            // An evader that moves the TSC offset needs a KVM that honours it.
            let probed = self.probe_tsc_moves(&RunSpec {
                evasions: Default::default(),
                ..spec.clone()
            });
            if let Err(MeasureError::Shaping(ShapingError::NotHonoured { flavour, .. })) = probed {
                return Err(spec.evasions.offset_ignored(flavour).into());
            }
            probed?;
        }
        // 3. Calibration, where the run is shaped.
        let (latency, outcome) = match spec.shaping {
            Shaping::None => (Latency::none(), None),
            _ => {
                let (latency, outcome) = self.calibrate(spec)?;
                (latency, Some(outcome))
            }
        };
        // 4. The run.
        let mut measurement = self.run_vm_traced(payload, spec, placement, latency, console, trace)?;
        measurement.trap_delivery = measurement.trap_delivery.or(trap_delivery);
        // 5. Recalibration: how far the host drifted while the run measured.
        measurement.shaping = match outcome {
            Some(outcome) => Some(ShapingOutcome {
                after: Some(self.calibration_rounds(spec)?),
                ..outcome
            }),
            None => None,
        };
        Ok(measurement)
    }

    /// A native run: the embedded core in a pinned host thread, or the payload's twin.
    fn run_native(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        placement: Placement,
        console: Option<&mut (dyn Write + Send)>,
    ) -> Result<Measurement, MeasureError> {
        let config = self.with_tsc_rate(spec.guest_config());
        let run = match native_twin(payload)? {
            None => native::run(&config, placement, spec.timeout)?,
            Some(twin) => native::run_twin(&twin, &config, placement, spec.timeout, console)?,
        };
        Ok(Measurement {
            results: run.results,
            run: run.run,
            native_cpu: Some(run.cpu),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_evasion_staged_on_a_patching_trap_makes_the_patch_the_testbeds() {
        let staged = |path, evasion: &[&str]| RunSpec {
            evasions: Evasions::parse(evasion.iter().copied()).unwrap(),
            ..RunSpec::new(path)
        };
        for trap in [Trap::IoPatch, Trap::Int3Patch] {
            assert!(staged(Path::TrapEmulate(trap), &["pause-counter"])
                .patched_for_an_evader()
                .is_some());
            assert_eq!(staged(Path::TrapEmulate(trap), &[]).patched_for_an_evader(), None);
        }
        for path in [Path::TrapEmulate(Trap::HwBreakpoint), Path::HwAssist, Path::Paravirt] {
            assert_eq!(staged(path, &["rdtsc-trap"]).patched_for_an_evader(), None, "{path:?}");
        }
    }
}
