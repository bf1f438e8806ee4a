//! Stages 3 and 5: setting latency shaping up for one run — TSC moves probed (stage 2's
//! [`Measurer::probe_tsc_moves`]), the unshaped cost of the same path and the residue's
//! bounds measured in a few short calibration rounds, and the native CPUID cost where
//! `--hide` has no target — and the same rounds again after the run.
//!
//! Every probe and round runs the *embedded* timing core on the run's path, never the
//! user's payload: what an exit costs belongs to the path (KVM, the trap, this VMM), and a
//! detector need not report the per-CPUID samples a calibration reads (a mean-of-ten
//! payload reports ten unfenced timings, or none at all).
use super::{MeasureError, Measurer, RunSpec};
use crate::host::Placement;
use crate::native;
use crate::results::ResultsError;
use crate::shaping::latency::{Latency, Shaping, CALIBRATION_MOVE};
use crate::shaping::outcome::{PathCost, ShapingOutcome};
use crate::shaping::plan::ResidueBounds;
use crate::stats::{self, Summary};
use crate::vm::loader::Payload;
use crate::vm::VmError;
use guest_payload::{Cycles, Probe};

/// Samples in calibration runs: enough for a stable median, short enough to be cheap.
pub const CALIBRATION_ITERATIONS: u32 = 1_000;
/// Calibration runs before and after each shaped run (odd: the median round is kept).
pub const CALIBRATION_ROUNDS: usize = 3;

impl Measurer {
    /// Probes, calibrates and returns the latency policy for `spec`'s run with what it was
    /// set up against.
    pub(super) fn calibrate(&self, spec: &RunSpec) -> Result<(Latency, ShapingOutcome), MeasureError> {
        let moves_tsc = spec.shaping.moves_tsc();
        let tsc_method = if moves_tsc {
            Some(self.probe_tsc_moves(spec)?)
        } else {
            None
        };
        let before = self.calibration_rounds(spec)?;
        let residue_bound = if moves_tsc { before.residue.lower } else { 0 };

        let native_target = match spec.shaping {
            Shaping::Hide { target: None } => {
                let config = spec
                    .cpuid_only(CALIBRATION_ITERATIONS, spec.warmup, Shaping::None)
                    .guest_config();
                let placement = Placement::choose(spec.cpu, spec.counter)?;
                let native = native::run(&config, placement, spec.timeout)?;
                let median = native
                    .results
                    .samples
                    .get(&Probe::Cpuid)
                    .map_or(0, |s| stats::median(s));
                u64::try_from(median).unwrap_or(0)
            }
            _ => 0,
        };
        let latency = Latency::new(spec.shaping.clone(), native_target, residue_bound);
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
        Ok((latency, outcome))
    }

    /// [`CALIBRATION_ROUNDS`] calibration runs. The baseline is the median round's, so one VM
    /// that ran while the host was loaded (or, on nested SVM, in its occasional slow mode)
    /// does not decide it; the residue's lower bound is the lowest of all rounds.
    pub fn calibration_rounds(&self, spec: &RunSpec) -> Result<PathCost, MeasureError> {
        let payload = &core()?;
        let rounds = (0..CALIBRATION_ROUNDS)
            .map(|_| self.round(payload, spec))
            .collect::<Result<Vec<_>, _>>()?;
        let mut baselines: Vec<Summary> = rounds.iter().map(|r| r.baseline).collect();
        baselines.sort_by_key(|b| b.median);
        let residues: Vec<ResidueBounds> = rounds.iter().map(|r| r.residue).collect();
        Ok(PathCost {
            baseline: baselines[baselines.len() / 2],
            residue: ResidueBounds::combine(&residues),
        })
    }

    /// One calibration run: the unshaped cost of the path, and the residue's bounds (measured
    /// through the same TSC-write path where the run moves the TSC).
    fn round(&self, payload: &Payload, spec: &RunSpec) -> Result<PathCost, MeasureError> {
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
        let measured = self.run_vm(payload, &calibration, Latency::new(shaping, 0, 0), None)?;
        // What the guest would have seen without the calibration's own TSC move.
        let guest_seen: Vec<Cycles> = measured
            .results
            .samples
            .get(&Probe::Cpuid)
            .map_or(Vec::new(), |s| s.iter().map(|&c| c.saturating_sub(moved)).collect());
        let baseline = stats::summarize(&guest_seen)
            .ok_or(ResultsError::Invalid("the calibration run returned no CPUID samples"))?;
        Ok(PathCost {
            baseline,
            residue: ResidueBounds::from_calibration(&guest_seen, &measured.shaped.handler_cycles()),
        })
    }
}

/// The embedded timing core, which every probe and calibration round runs.
pub(super) fn core() -> Result<Payload, MeasureError> {
    Payload::embedded().map_err(|e| MeasureError::Vm(VmError::from(e)))
}
