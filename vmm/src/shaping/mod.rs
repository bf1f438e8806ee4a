//! Latency shaping: what a CPUID exit handled by this VMM appears to cost the guest.
//!
//! - `Inject`: spin in the exit handler — real, wall-clock latency;
//! - `VirtualInject`: move the guest TSC forward, without spending the time;
//! - `Hide`: move the guest TSC back by what the exit cost beyond a target;
//! - `Profile`: like `Hide`, with a target drawn per exit from a distribution.
//!
//! The arithmetic is in [`plan`], tested on a simulated clock; [`tsc`] moves the TSC.

pub mod plan;
pub mod profile;
pub mod tsc;

use kvm_ioctls::VcpuFd;
use profile::{Profile, SplitMix64};
use serde::Serialize;
use tsc::{TscError, TscMethod, TscMover};

#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("cannot move the guest TSC: {0}")]
    Tsc(#[from] TscError),
    #[error(
        "TSC moves are not honoured by this KVM ({flavour}): a {requested}-cycle move through {method:?} \
         left the guest-seen cost at {seen} cycles, so --hide, --virtual-inject-cycles and --profile cannot work here. \
         They need a KVM that applies TSC offset writes (hardware VT-x/AMD-V KVM, or ../shared/nested-svm/run)"
    )]
    NotHonoured {
        flavour: &'static str,
        method: TscMethod,
        requested: u64,
        seen: u64,
    },
    #[error("{0} shapes exits the VMM handles: use --mode trap-emulate or --mode paravirt")]
    NeedsVmmExits(&'static str),
}

/// The TSC move of every calibration exit. Writes that change the offset take a different
/// kernel path from writes that do not (KVM's "matched" TSC writes), and on nested SVM
/// tiny moves were seen to leave a whole VM's exits twice as dear now and then; moves of
/// this size never were (docs/shaping.md).
pub const CALIBRATION_MOVE: u64 = 100_000;

/// What to do to each CPUID exit.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Shaping {
    #[default]
    None,
    /// Spin this many cycles in the handler.
    Inject { cycles: u64 },
    /// Move the guest TSC forward by this many cycles.
    VirtualInject { cycles: u64 },
    /// Make every exit cost the guest `target` cycles (`None`: the native CPUID median,
    /// measured at start).
    Hide { target: Option<u64> },
    /// Make each exit cost a target drawn from the profile.
    Profile { profile: Box<Profile>, seed: u64 },
    /// Move the TSC forward by [`CALIBRATION_MOVE`] on every exit: calibration runs take
    /// the same kernel path as shaped ones, and the move is subtracted afterwards.
    CalibrateResidue,
}

impl Shaping {
    pub fn kind(&self) -> &'static str {
        match self {
            Shaping::None => "none",
            Shaping::Inject { .. } => "inject",
            Shaping::VirtualInject { .. } => "virtual-inject",
            Shaping::Hide { .. } => "hide",
            Shaping::Profile { .. } => "profile",
            Shaping::CalibrateResidue => "calibrate-residue",
        }
    }

    /// True where the TSC must be moved.
    pub fn moves_tsc(&self) -> bool {
        matches!(
            self,
            Shaping::VirtualInject { .. } | Shaping::Hide { .. } | Shaping::Profile { .. } | Shaping::CalibrateResidue
        )
    }
}

/// Applies a [`Shaping`] to each exit of one vCPU.
pub struct Shaper {
    shaping: Shaping,
    /// Hide's target once resolved.
    target: u64,
    residue: u64,
    rng: SplitMix64,
    tsc: Option<TscMover>,
    /// Calibration only: handler cycles up to the point where shaping measures them.
    calibration_handler_cycles: Vec<u64>,
}

impl Shaper {
    /// `target` resolves `Hide { target: None }`; `residue` comes from calibration.
    pub fn new(shaping: Shaping, target: u64, residue: u64) -> Self {
        let seed = match &shaping {
            Shaping::Profile { seed, .. } => *seed,
            _ => 0,
        };
        let target = match &shaping {
            Shaping::Hide { target: Some(t) } => *t,
            _ => target,
        };
        Self {
            shaping,
            target,
            residue,
            rng: SplitMix64::new(seed),
            tsc: None,
            calibration_handler_cycles: Vec::new(),
        }
    }

    pub fn none() -> Self {
        Self::new(Shaping::None, 0, 0)
    }

    /// Opens the TSC mover, once, before the vCPU runs.
    pub fn arm(&mut self, vcpu: &VcpuFd) -> Result<(), ShapingError> {
        if self.shaping.moves_tsc() {
            self.tsc = Some(TscMover::open(vcpu)?);
        }
        Ok(())
    }

    /// How it moved the TSC, if it did.
    pub fn tsc_method(&self) -> Option<TscMethod> {
        self.tsc.as_ref().map(|t| t.method)
    }

    /// Calibration runs: the handler cycles each exit had spent when shaping ran.
    pub fn calibration_handler_cycles(&self) -> &[u64] {
        &self.calibration_handler_cycles
    }

    /// Called at the end of each CPUID exit, after the answer is in the registers.
    pub fn after_exit(&mut self, vcpu: &VcpuFd, exit_tsc: u64) -> Result<(), ShapingError> {
        let now = guest_payload::timing::read_tsc;
        let delta = match &self.shaping {
            Shaping::None => return Ok(()),
            Shaping::Inject { cycles } => {
                plan::spin_until(now(), *cycles, now);
                return Ok(());
            }
            Shaping::VirtualInject { cycles } => *cycles as i64,
            Shaping::CalibrateResidue => {
                // Measured exactly where Hide measures it, so that the residue covers the
                // TSC write that follows (an ioctl: thousands of cycles, more when nested).
                self.calibration_handler_cycles.push(now() - exit_tsc);
                CALIBRATION_MOVE as i64
            }
            Shaping::Hide { .. } => plan::hide_adjustment(self.target, now() - exit_tsc, self.residue),
            Shaping::Profile { profile, .. } => {
                let target = profile.distribution.sample(&mut self.rng);
                plan::hide_adjustment(target, now() - exit_tsc, self.residue)
            }
        };
        match self.tsc.as_mut() {
            Some(tsc) => Ok(tsc.move_by(vcpu, delta)?),
            None => Ok(()),
        }
    }
}

/// What the report says about shaping.
#[derive(Clone, Debug, Serialize)]
pub struct ShapingReport {
    pub kind: &'static str,
    /// Inject and virtual inject: cycles added; hide and profile: the guest-seen target.
    pub requested_cycles: u64,
    /// The same, as measured: the CPUID median over the unshaped calibration runs' (the
    /// mean of the baselines before and after, which cancels a steady drift), or the
    /// guest-seen median.
    pub achieved_cycles: i64,
    pub requested_ns: f64,
    pub achieved_ns: f64,
    /// The guest-seen CPUID median of the unshaped calibration run in this invocation.
    pub baseline_cycles: u64,
    /// p95 - p5 of the calibration run: the noise the comparison lives with.
    pub baseline_spread_cycles: u64,
    /// Kernel entry/exit residue calibrated at start (TSC-moving kinds).
    pub residue_cycles: Option<u64>,
    /// The baseline and residue measured again after the run, and the larger of their
    /// relative changes: above ~0.1 the host's exit costs moved while the run measured,
    /// and `achieved` says more about the host than about the shaping.
    pub baseline_after_cycles: Option<u64>,
    pub residue_after_cycles: Option<u64>,
    pub calibration_drift: Option<f64>,
    pub tsc_method: Option<TscMethod>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}
