//! One measurement: the timing core run once in one mode, natively or in a fresh VM.

use crate::busy::Busy;
use crate::host;
use crate::modes::hw_assist::HwAssist;
use crate::modes::paravirt::Paravirt;
use crate::modes::trap_emulate::{Trap, TrapDelivery, TrapEmulate};
use crate::modes::{CpuidExitHandler, Mode, ModeError};
use crate::native::{self, NativeError};
use crate::shaping::tsc::TscMethod;
use crate::shaping::{plan, Shaper, Shaping, ShapingError, CALIBRATION_MOVE};
use crate::stats::{self, Summary};
use crate::vm::exits::ExitStats;
use crate::vm::loader::Payload;
use crate::vm::{GuestVm, VmError};
use guest_payload::{flags, Config, CpuidRecord, Probe, ABI_VERSION, CONFIG_MAGIC};
use kvm_ioctls::Kvm;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

/// The most iterations a run may ask for: beyond this the samples alone outgrow the
/// guest's mapped gigabyte, and the run would take hours on an emulating KVM.
pub const MAX_ITERATIONS: u32 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_open_hint(.0))]
    OpenKvm(kvm_ioctls::Error),
    #[error("iterations must be between 1 and {MAX_ITERATIONS}, not {0}")]
    Iterations(u64),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Shaping(#[from] ShapingError),
    #[error("cannot start the --busy threads: {0}")]
    Busy(std::io::Error),
}

fn kvm_open_hint(error: &kvm_ioctls::Error) -> &'static str {
    match error.errno() {
        libc::ENOENT => " (no /dev/kvm: load the kvm module for your CPU, kvm_intel or kvm_amd, and enable VT-x/AMD-V in the firmware)",
        libc::EACCES | libc::EPERM => " (permission denied: add yourself to the group that owns /dev/kvm, e.g. `sudo usermod -aG kvm $USER`, then log in again)",
        _ => "",
    }
}

/// Opens /dev/kvm with a message that says what to do when it fails.
pub fn open_kvm() -> Result<Kvm, MeasureError> {
    Kvm::new().map_err(MeasureError::OpenKvm)
}

/// What to run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub mode: Mode,
    /// How trap-emulate traps CPUID.
    pub trap: Trap,
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
}

impl RunSpec {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            trap: Trap::default(),
            shaping: Shaping::None,
            iterations: 10_000,
            warmup: 100,
            cpuid_leaf: 0,
            cpuid_subleaf: 0,
            probes: Probe::ALL.iter().map(|p| p.bit()).sum(),
            guest_flags: 0,
            snapshot: true,
            timeout: Duration::from_secs(60),
            cpu: None,
            busy: 0,
        }
    }

    /// The config block this spec becomes.
    pub fn guest_config(&self) -> Config {
        let paravirt = if self.mode == Mode::Paravirt {
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
            ..Default::default()
        }
    }

    /// A short run of the CPUID probe alone, for probes and calibration.
    fn cpuid_only(&self, iterations: u32, warmup: u32, shaping: Shaping) -> Self {
        Self {
            snapshot: false,
            shaping,
            iterations,
            warmup,
            probes: Probe::Cpuid.bit(),
            guest_flags: 0,
            ..self.clone()
        }
    }
}

/// How shaping was set up for a run: what it asked for and what it was compared with.
#[derive(Clone, Debug)]
pub struct ShapingOutcome {
    pub kind: &'static str,
    pub requested_cycles: u64,
    /// True where the request is an addition to the baseline (inject kinds), false where
    /// it is the guest-seen cost itself (hide, profile).
    pub additive: bool,
    /// The unshaped cost of the path, measured before the shaped run.
    pub before: CalibrationRound,
    /// The same calibration, measured again after the shaped run: how far the host drifted
    /// while it ran (a loaded host, an emulated one, changes its exit costs over seconds).
    pub after: Option<CalibrationRound>,
    /// How the run moved the TSC; `None` for kinds that do not (inject).
    pub tsc_method: Option<TscMethod>,
    pub profile: Option<String>,
    pub seed: Option<u64>,
}

impl ShapingOutcome {
    /// The residues before and after: they mean something only where the TSC moved.
    pub fn residues(&self) -> Option<(u64, Option<u64>)> {
        self.tsc_method
            .map(|_| (self.before.residue, self.after.map(|a| a.residue)))
    }
}

/// What one run measured, whatever the mode.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub samples: BTreeMap<Probe, Vec<u64>>,
    pub cpuid: Vec<CpuidRecord>,
    /// The CPUID sites' bytes as the measured code read them.
    pub site_bytes: Vec<[u8; 2]>,
    pub exits: ExitStats,
    /// VM creation to the first KVM_RUN (VM modes only).
    pub setup: Option<Duration>,
    pub run: Duration,
    /// The guest TSC rate KVM reported (VM modes only).
    pub kvm_tsc_khz: Option<u32>,
    /// The host CPU the native runner was pinned to.
    pub native_cpu: Option<usize>,
    /// How trap-emulate's traps arrived.
    pub trap_delivery: Option<TrapDelivery>,
    pub shaping: Option<ShapingOutcome>,
    /// Calibration runs: handler cycles at the point where shaping measures them.
    pub calibration_handler_cycles: Vec<u64>,
    /// How the run moved the guest TSC, where it did.
    pub tsc_method: Option<TscMethod>,
}

/// Runs `spec` once. `kvm` is needed for the VM modes only.
pub fn measure(
    kvm: Option<&Kvm>,
    payload: &Payload,
    spec: &RunSpec,
    console: Option<&mut dyn Write>,
) -> Result<Measurement, MeasureError> {
    if spec.iterations == 0 || spec.iterations > MAX_ITERATIONS {
        return Err(MeasureError::Iterations(u64::from(spec.iterations)));
    }
    if spec.shaping != Shaping::None && !matches!(spec.mode, Mode::TrapEmulate | Mode::Paravirt) {
        return Err(ShapingError::NeedsVmmExits(spec.shaping.kind()).into());
    }
    // Started before anything is measured and stopped (on drop) after everything is.
    let _busy = Busy::start(spec.busy).map_err(MeasureError::Busy)?;
    if spec.mode == Mode::Native {
        let run = native::run(&spec.guest_config(), spec.cpu)?;
        return Ok(Measurement {
            samples: run.samples,
            cpuid: run.cpuid,
            site_bytes: run.site_bytes,
            run: run.run,
            native_cpu: Some(run.cpu),
            ..Default::default()
        });
    }
    let owned_kvm;
    let kvm = match kvm {
        Some(kvm) => kvm,
        None => {
            owned_kvm = open_kvm()?;
            &owned_kvm
        }
    };
    let trap_delivery = match spec.mode {
        Mode::TrapEmulate => Some(probe_trap(kvm, payload, spec)?),
        _ => None,
    };
    let (shaper, shaping) = match spec.shaping {
        Shaping::None => (Shaper::none(), None),
        _ => {
            let (shaper, outcome) = calibrate(kvm, payload, spec)?;
            (shaper, Some(outcome))
        }
    };
    let mut measurement = run_mode(kvm, payload, spec, shaper, console)?;
    measurement.trap_delivery = trap_delivery;
    measurement.shaping = match shaping {
        Some(outcome) => Some(ShapingOutcome {
            after: Some(calibration_rounds(kvm, payload, spec)?),
            ..outcome
        }),
        None => None,
    };
    Ok(measurement)
}

/// One VM run of `spec` with the handler its mode needs.
fn run_mode(
    kvm: &Kvm,
    payload: &Payload,
    spec: &RunSpec,
    shaper: Shaper,
    console: Option<&mut dyn Write>,
) -> Result<Measurement, MeasureError> {
    match spec.mode {
        Mode::Native | Mode::HwAssist => run_vm(kvm, payload, spec, &mut HwAssist, console),
        Mode::TrapEmulate => run_vm(kvm, payload, spec, &mut TrapEmulate::new(spec.trap, shaper), console),
        Mode::Paravirt => run_vm(kvm, payload, spec, &mut Paravirt::new(shaper), console),
    }
}

fn run_vm(
    kvm: &Kvm,
    payload: &Payload,
    spec: &RunSpec,
    handler: &mut dyn CpuidExitHandler,
    console: Option<&mut dyn Write>,
) -> Result<Measurement, MeasureError> {
    let mut vm = GuestVm::create(kvm, payload, &spec.guest_config())?;
    let (setup, stats) = vm.run(handler, spec.timeout, console)?;
    let results = vm.results()?;
    Ok(Measurement {
        samples: results.samples,
        cpuid: results.cpuid,
        site_bytes: results.site_bytes,
        exits: stats.exits,
        setup: Some(setup),
        run: stats.run,
        kvm_tsc_khz: vm.tsc_khz,
        calibration_handler_cycles: handler
            .shaper()
            .map_or(Vec::new(), |s| s.calibration_handler_cycles().to_vec()),
        tsc_method: handler.shaper().and_then(Shaper::tsc_method),
        ..Default::default()
    })
}

/// Does this KVM deliver the trap at all? One CPUID, trapped, finds out.
fn probe_trap(kvm: &Kvm, payload: &Payload, spec: &RunSpec) -> Result<TrapDelivery, MeasureError> {
    let probe = spec.cpuid_only(1, 0, Shaping::None);
    let mut handler = TrapEmulate::new(spec.trap, Shaper::none());
    let unavailable = |why: String| {
        MeasureError::Mode(ModeError::TrapUnavailable {
            trap: spec.trap.name(),
            why,
        })
    };
    match run_vm(kvm, payload, &probe, &mut handler, None) {
        Ok(_) => handler.delivery.ok_or_else(|| {
            unavailable("the guest's CPUID ran to completion without a single debug exit (breakpoints armed with KVM_SET_GUEST_DEBUG do not fire)".into())
        }),
        Err(MeasureError::Vm(VmError::TripleFault { rip })) => {
            Err(unavailable(format!("the trap became a triple fault in the guest at RIP {rip} instead of an exit to the VMM")))
        }
        Err(MeasureError::Vm(VmError::InternalError { what, rip })) => Err(unavailable(format!("KVM failed at RIP {rip}: {what}"))),
        Err(other) => Err(other),
    }
}

/// A guest-visible move this large cannot be mistaken for noise.
const PROBE_MOVE: u64 = 1 << 32;

/// Do TSC moves reach the guest? Moves the TSC during a few CPUID exits and asks the guest
/// what it saw. Returns the method that worked.
fn probe_tsc_moves(kvm: &Kvm, payload: &Payload, spec: &RunSpec) -> Result<TscMethod, MeasureError> {
    let probe = spec.cpuid_only(16, 2, Shaping::VirtualInject { cycles: PROBE_MOVE });
    let shaper = Shaper::new(probe.shaping.clone(), 0, 0);
    let measured = run_mode(kvm, payload, &probe, shaper, None)?;
    let seen = measured.samples.get(&Probe::Cpuid).map_or(0, |s| stats::median(s));
    let method = measured
        .tsc_method
        .ok_or(MeasureError::Vm(VmError::BadResults("the TSC probe moved no TSC")))?;
    if seen >= PROBE_MOVE / 2 {
        return Ok(method);
    }
    Err(ShapingError::NotHonoured {
        flavour: host::kvm_flavour().0.describe(),
        method,
        requested: PROBE_MOVE,
        seen,
    }
    .into())
}

/// Probes TSC moves where needed, then measures the unshaped cost of the same path in
/// [`CALIBRATION_ROUNDS`] rounds (the baseline, and the residue through the same TSC-write
/// path the run will take), and the native CPUID cost where `--hide` has no explicit target.
fn calibrate(kvm: &Kvm, payload: &Payload, spec: &RunSpec) -> Result<(Shaper, ShapingOutcome), MeasureError> {
    let moves_tsc = spec.shaping.moves_tsc();
    let tsc_method = if moves_tsc {
        Some(probe_tsc_moves(kvm, payload, spec)?)
    } else {
        None
    };
    let before = calibration_rounds(kvm, payload, spec)?;
    let residue = if moves_tsc { before.residue } else { 0 };

    let native_target = match spec.shaping {
        Shaping::Hide { target: None } => {
            let native = native::run(
                &spec
                    .cpuid_only(CALIBRATION_ITERATIONS, spec.warmup, Shaping::None)
                    .guest_config(),
                spec.cpu,
            )?;
            native.samples.get(&Probe::Cpuid).map_or(0, |s| stats::median(s))
        }
        _ => 0,
    };
    let shaper = Shaper::new(spec.shaping.clone(), native_target, residue);
    let (requested_cycles, additive, profile, seed) = match &spec.shaping {
        Shaping::Inject { cycles } | Shaping::VirtualInject { cycles } => (*cycles, true, None, None),
        Shaping::Hide { target } => (target.unwrap_or(native_target), false, None, None),
        Shaping::Profile { profile, seed } => (
            profile.distribution.median(),
            false,
            Some(profile.name.clone()),
            Some(*seed),
        ),
        Shaping::None | Shaping::CalibrateResidue => (0, true, None, None),
    };
    let outcome = ShapingOutcome {
        kind: spec.shaping.kind(),
        requested_cycles,
        additive,
        before,
        after: None,
        tsc_method,
        profile,
        seed,
    };
    Ok((shaper, outcome))
}

/// One calibration run: the unshaped cost of the path, and the residue the shaping
/// arithmetic needs (measured through the same TSC-write path where the run moves the TSC).
#[derive(Clone, Copy, Debug)]
pub struct CalibrationRound {
    pub baseline: Summary,
    pub residue: u64,
}

fn calibration_round(kvm: &Kvm, payload: &Payload, spec: &RunSpec) -> Result<CalibrationRound, MeasureError> {
    let shaping = if spec.shaping.moves_tsc() {
        Shaping::CalibrateResidue
    } else {
        Shaping::None
    };
    let calibration = spec.cpuid_only(
        spec.iterations.min(CALIBRATION_ITERATIONS),
        spec.warmup,
        shaping.clone(),
    );
    let moved = if shaping == Shaping::CalibrateResidue {
        CALIBRATION_MOVE
    } else {
        0
    };
    let measured = run_mode(kvm, payload, &calibration, Shaper::new(shaping, 0, 0), None)?;
    // What the guest would have seen without the calibration's own TSC move.
    let guest_seen: Vec<u64> = measured
        .samples
        .get(&Probe::Cpuid)
        .map_or(Vec::new(), |s| s.iter().map(|c| c.wrapping_sub(moved)).collect());
    let guest_seen = guest_seen.as_slice();
    let baseline = stats::summarize(guest_seen).ok_or(MeasureError::Vm(VmError::BadResults(
        "the calibration run returned no CPUID samples",
    )))?;
    Ok(CalibrationRound {
        baseline,
        residue: plan::residue(guest_seen, &measured.calibration_handler_cycles),
    })
}

/// [`CALIBRATION_ROUNDS`] calibration runs; the residue and the baseline are each their
/// median, so one VM that ran while the host was loaded (or, on nested SVM, in its
/// occasional slow mode) does not decide the calibration.
fn calibration_rounds(kvm: &Kvm, payload: &Payload, spec: &RunSpec) -> Result<CalibrationRound, MeasureError> {
    let rounds = (0..CALIBRATION_ROUNDS)
        .map(|_| calibration_round(kvm, payload, spec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut baselines: Vec<Summary> = rounds.iter().map(|r| r.baseline).collect();
    baselines.sort_by_key(|b| b.median);
    let residues: Vec<u64> = rounds.iter().map(|r| r.residue).collect();
    Ok(CalibrationRound {
        baseline: baselines[baselines.len() / 2],
        residue: stats::median(&residues),
    })
}

/// Samples in calibration runs: enough for a stable median, short enough to be cheap.
const CALIBRATION_ITERATIONS: u32 = 1_000;
/// Calibration runs per shaped run (odd: the median round is kept).
const CALIBRATION_ROUNDS: usize = 3;

/// Asks KVM for its TSC rate without running anything (for native runs' reports).
pub fn kvm_tsc_khz(kvm: &Kvm) -> Option<u32> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().filter(|&k| k > 0)
}
