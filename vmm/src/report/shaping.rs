//! What a report says about shaping: requested against achieved, the achieved
//! distribution, how much of each exit was provably hidden, and the calibration it rests on.

use crate::shaping::outcome::ShapingOutcome;
use crate::shaping::ShapedExits;
use crate::stats::{self, Summary};
use crate::vm::tsc::TscMethod;
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct ShapingReport {
    pub kind: &'static str,
    /// Inject and virtual inject: cycles added; hide and profile: the guest-seen target.
    pub requested_cycles: u64,
    /// The same, as measured: for inject kinds the CPUID median over the unshaped
    /// baseline (the mean of the baselines before and after, which cancels a steady
    /// drift); for hide and profile the guest-seen median itself. `None` where the
    /// payload reports no `cpuid` samples (a mean-of-ten detector): its own figures are
    /// then all there is of what the guest saw.
    pub achieved_cycles: Option<i64>,
    /// The achieved distribution's 5th and 95th percentiles, on the same terms.
    pub achieved_p5_cycles: Option<i64>,
    pub achieved_p95_cycles: Option<i64>,
    pub requested_ns: f64,
    pub achieved_ns: Option<f64>,
    /// Samples in which the guest saw its TSC run backwards (must be zero for hide).
    pub backwards_samples: Option<u64>,
    /// The guest-seen CPUID median of the unshaped calibration runs in this invocation
    /// (the embedded timing core's `cpuid` probe, on the same path).
    pub baseline_cycles: i64,
    /// p95 - p5 of the calibration run: the noise the comparison lives with.
    pub baseline_spread_cycles: i64,
    /// The kernel's part of an exit (TSC-moving kinds): its median, and the lower bound
    /// hiding may take back.
    pub residue_cycles: Option<u64>,
    pub residue_lower_bound_cycles: Option<u64>,
    /// Hide and profile: cycles moved back per exit (median), and that as a share of the
    /// unshaped cost: what the VMM could prove the exit took and took back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_cycles_median: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_fraction: Option<f64>,
    /// The VMM's time per shaped exit up to the shaping, median.
    pub handler_cycles_median: u64,
    /// The baseline and residue measured again after the run, and the larger of their
    /// relative changes: above ~0.1 the host's exit costs moved while the run measured,
    /// and `achieved` says more about the host than about the shaping.
    pub baseline_after_cycles: Option<i64>,
    pub residue_after_cycles: Option<u64>,
    pub calibration_drift: Option<f64>,
    pub tsc_method: Option<TscMethod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl ShapingReport {
    /// `cpuid` is the shaped run's CPUID summary (if the payload reported one), `exits`
    /// what the shaper did.
    pub fn new(outcome: &ShapingOutcome, cpuid: Option<&Summary>, exits: &ShapedExits, tsc_khz: u32) -> Self {
        let (before, after) = (&outcome.before, outcome.after.as_ref());
        let baseline = after.map_or(before.baseline.median, |a| {
            before.baseline.median / 2 + a.baseline.median / 2
        });
        let on_terms = |cycles: i64| {
            if outcome.additive {
                cycles.saturating_sub(baseline)
            } else {
                cycles
            }
        };
        let change = |before: f64, after: f64| (after - before).abs() / before.abs().max(1.0);
        let residues = outcome.residues();
        let drift = after.map(|a| {
            let baseline_drift = change(before.baseline.median as f64, a.baseline.median as f64);
            let residue_drift = match residues {
                Some((r, Some(r_after))) => change(r.median as f64, r_after.median as f64),
                _ => 0.0,
            };
            round2(baseline_drift.max(residue_drift))
        });
        let hides = !outcome.additive && outcome.tsc_method.is_some();
        let hidden: Vec<u64> = exits.moves().iter().map(|&m| m.min(0).unsigned_abs()).collect();
        let hidden_median = hides.then(|| stats::median(&hidden));
        let ns = |cycles: f64| round2(stats::cycles_to_ns(cycles, tsc_khz));
        Self {
            kind: outcome.kind,
            requested_cycles: outcome.requested_cycles,
            achieved_cycles: cpuid.map(|c| on_terms(c.median)),
            achieved_p5_cycles: cpuid.map(|c| on_terms(c.p5)),
            achieved_p95_cycles: cpuid.map(|c| on_terms(c.p95)),
            requested_ns: ns(outcome.requested_cycles as f64),
            achieved_ns: cpuid.map(|c| ns(on_terms(c.median) as f64)),
            backwards_samples: cpuid.map(|c| c.backwards),
            baseline_cycles: before.baseline.median,
            baseline_spread_cycles: before.baseline.p95.saturating_sub(before.baseline.p5),
            residue_cycles: residues.map(|(r, _)| r.median),
            residue_lower_bound_cycles: residues.map(|(r, _)| r.lower),
            hidden_cycles_median: hidden_median,
            hidden_fraction: hidden_median.map(|h| round2(h as f64 / before.baseline.median.max(1) as f64)),
            handler_cycles_median: stats::median(&exits.handler_cycles()),
            baseline_after_cycles: after.map(|a| a.baseline.median),
            residue_after_cycles: residues.and_then(|(_, a)| a.map(|a| a.median)),
            calibration_drift: drift,
            tsc_method: outcome.tsc_method,
            profile: outcome.profile.clone(),
            seed: outcome.seed,
        }
    }
}
