//! What a shaped run was set up against: the unshaped cost of its path and the residue's
//! bounds, measured before the run and again after it (`measure`'s calibration rounds).

use super::plan::ResidueBounds;
use crate::stats::Summary;
use crate::vm::tsc::TscMethod;

/// The unshaped cost of a path, and the residue's bounds measured through the same
/// TSC-write path the run will take.
#[derive(Clone, Copy, Debug)]
pub struct PathCost {
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
    pub before: PathCost,
    /// The same, measured again after the shaped run: how far the host drifted while it
    /// ran (a loaded host, an emulated one, changes its exit costs over seconds).
    pub after: Option<PathCost>,
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
