//! Setting shaping up for one run: probe that TSC moves reach the guest (once per
//! process), measure the unshaped cost of the same path and the residue's bounds in a few
//! short calibration rounds, and the native CPUID cost where `--hide` has no target.
//!
//! Every probe and round runs the *embedded* timing core on the run's path, never the
//! user's payload: what an exit costs belongs to the path (KVM, the trap, this VMM), and a
//! detector need not report the per-CPUID samples a calibration reads (a mean-of-ten
//! payload reports ten unfenced timings, or none at all).

use super::plan::ResidueBounds;
use super::{Shaper, Shaping, ShapingError, CALIBRATION_MOVE};
use crate::host;
use crate::measure::{MeasureError, Measurer, RunSpec};
use crate::native;
use crate::stats::{self, Summary};
use crate::vm::loader::Payload;
use crate::vm::tsc::TscMethod;
use crate::vm::VmError;
use guest_payload::{Cycles, Probe};

/// Samples in calibration runs: enough for a stable median, short enough to be cheap.
pub const CALIBRATION_ITERATIONS: u32 = 1_000;
/// Calibration runs before and after each shaped run (odd: the median round is kept).
pub const CALIBRATION_ROUNDS: usize = 3;
/// A guest-visible move this large cannot be mistaken for noise.
const PROBE_MOVE: u64 = 1 << 32;

/// The unshaped cost of a path, and the residue's bounds measured through the same
/// TSC-write path the run will take.
#[derive(Clone, Copy, Debug)]
pub struct CalibrationRound {
    pub baseline: Summary,
    pub residue: ResidueBounds,
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
    /// The same, measured again after the shaped run: how far the host drifted while it
    /// ran (a loaded host, an emulated one, changes its exit costs over seconds).
    pub after: Option<CalibrationRound>,
    /// How the run moved the TSC; `None` for kinds that do not (inject).
    pub tsc_method: Option<TscMethod>,
    pub profile: Option<String>,
    pub seed: Option<u64>,
}

impl ShapingOutcome {
    /// The residues before and after: they mean something only where the TSC moved.
    pub fn residues(&self) -> Option<(ResidueBounds, Option<ResidueBounds>)> {
        self.tsc_method
            .map(|_| (self.before.residue, self.after.map(|a| a.residue)))
    }
}

/// Probes, calibrates and returns the shaper for `spec`'s run with what it was set up
/// against.
pub fn prepare(measurer: &Measurer, spec: &RunSpec) -> Result<(Shaper, ShapingOutcome), MeasureError> {
    let moves_tsc = spec.shaping.moves_tsc();
    let tsc_method = if moves_tsc {
        Some(probe_tsc_moves(measurer, spec)?)
    } else {
        None
    };
    let before = rounds(measurer, spec)?;
    let residue_bound = if moves_tsc { before.residue.lower } else { 0 };

    let native_target = match spec.shaping {
        Shaping::Hide { target: None } => {
            let config = spec
                .cpuid_only(CALIBRATION_ITERATIONS, spec.warmup, Shaping::None)
                .guest_config();
            let native = native::run(&config, spec.cpu, spec.timeout)?;
            let median = native.samples.get(&Probe::Cpuid).map_or(0, |s| stats::median(s));
            u64::try_from(median).unwrap_or(0)
        }
        _ => 0,
    };
    let shaper = Shaper::new(spec.shaping.clone(), native_target, residue_bound);
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

/// Do TSC moves reach the guest? Moves the TSC during a few CPUID exits and asks the guest
/// what it saw. Returns the method that worked; remembered per path.
pub fn probe_tsc_moves(measurer: &Measurer, spec: &RunSpec) -> Result<TscMethod, MeasureError> {
    let payload = &core()?;
    if let Some(method) = measurer.known_tsc_method(payload, spec.path) {
        return Ok(method);
    }
    let probe = spec.cpuid_only(16, 2, Shaping::VirtualInject { cycles: PROBE_MOVE });
    let shaper = Shaper::new(probe.shaping.clone(), 0, 0);
    let measured = measurer.run_vm(payload, &probe, shaper, None)?;
    let seen = measured.samples.get(&Probe::Cpuid).map_or(0, |s| stats::median(s));
    let method = measured
        .tsc_method
        .ok_or(MeasureError::Vm(VmError::BadResults("the TSC probe moved no TSC")))?;
    if seen >= (PROBE_MOVE / 2) as Cycles {
        measurer.remember_tsc_method(payload, spec.path, method);
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

/// The embedded timing core, which every probe and calibration round runs.
fn core() -> Result<Payload, MeasureError> {
    Payload::embedded().map_err(|e| MeasureError::Vm(VmError::from(e)))
}

/// One calibration run: the unshaped cost of the path, and the residue's bounds (measured
/// through the same TSC-write path where the run moves the TSC).
fn round(measurer: &Measurer, payload: &Payload, spec: &RunSpec) -> Result<CalibrationRound, MeasureError> {
    let shaping = if spec.shaping.moves_tsc() {
        Shaping::CalibrateResidue
    } else {
        Shaping::None
    };
    let moved = if shaping == Shaping::CalibrateResidue {
        CALIBRATION_MOVE as Cycles
    } else {
        0
    };
    let calibration = spec.cpuid_only(
        spec.iterations.min(CALIBRATION_ITERATIONS),
        spec.warmup,
        shaping.clone(),
    );
    let measured = measurer.run_vm(payload, &calibration, Shaper::new(shaping, 0, 0), None)?;
    // What the guest would have seen without the calibration's own TSC move.
    let guest_seen: Vec<Cycles> = measured
        .samples
        .get(&Probe::Cpuid)
        .map_or(Vec::new(), |s| s.iter().map(|&c| c.saturating_sub(moved)).collect());
    let baseline = stats::summarize(&guest_seen).ok_or(MeasureError::Vm(VmError::BadResults(
        "the calibration run returned no CPUID samples",
    )))?;
    Ok(CalibrationRound {
        baseline,
        residue: ResidueBounds::from_calibration(&guest_seen, &measured.shaped.handler_cycles),
    })
}

/// [`CALIBRATION_ROUNDS`] calibration runs. The baseline is the median round's, so one VM
/// that ran while the host was loaded (or, on nested SVM, in its occasional slow mode)
/// does not decide it; the residue's lower bound is the lowest of all rounds.
pub fn rounds(measurer: &Measurer, spec: &RunSpec) -> Result<CalibrationRound, MeasureError> {
    let payload = &core()?;
    let rounds = (0..CALIBRATION_ROUNDS)
        .map(|_| round(measurer, payload, spec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut baselines: Vec<Summary> = rounds.iter().map(|r| r.baseline).collect();
    baselines.sort_by_key(|b| b.median);
    let residues: Vec<ResidueBounds> = rounds.iter().map(|r| r.residue).collect();
    Ok(CalibrationRound {
        baseline: baselines[baselines.len() / 2],
        residue: ResidueBounds::combine(&residues),
    })
}
