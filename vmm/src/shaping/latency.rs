//! Latency shaping, the policy behind `--inject-*`, `--virtual-inject-*`, `--hide` and
//! `--profile`: what each CPUID exit this VMM answers appears to cost the guest.
//!
//! - `Inject`: spin in the exit handler — real, wall-clock latency;
//! - `VirtualInject`: move the guest TSC forward, without spending the time;
//! - `Hide`: move the guest TSC back by what the exit provably cost beyond a target;
//! - `Profile`: like `Hide`, with a target drawn per exit from a distribution.
//!
//! The arithmetic is in [`super::plan`], tested on a simulated clock.

use super::plan;
use super::policy::{ExitPolicy, PolicyRecord, ShapedExits, ShapingError};
use super::profile::Profile;
use crate::stats::SplitMix64;
use crate::vm::accounting::KEPT_PER_KIND;
use crate::vm::tsc::TscMethod;
use crate::vm::vcpu::Vcpu;

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
    /// Make every exit cost the guest at least `target` cycles, as close to it as can be
    /// proved (`None`: the native CPUID median, measured at start).
    Hide { target: Option<u64> },
    /// Make each exit cost a target drawn from the profile (at least).
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

/// Applies a [`Shaping`] to each CPUID exit of one vCPU.
pub struct Latency {
    shaping: Shaping,
    /// Hide's target once resolved.
    target: u64,
    /// What hiding may take back of the kernel's part of each exit.
    residue_lower_bound: u64,
    rng: SplitMix64,
    tsc_method: Option<TscMethod>,
    exits: ShapedExits,
}

impl Latency {
    /// `target` resolves `Hide { target: None }`; the residue bound comes from calibration.
    pub fn new(shaping: Shaping, target: u64, residue_lower_bound: u64) -> Self {
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
            residue_lower_bound,
            rng: SplitMix64::new(seed),
            tsc_method: None,
            exits: ShapedExits::default(),
        }
    }

    pub fn none() -> Self {
        Self::new(Shaping::None, 0, 0)
    }

    /// Room for this many exits in the per-exit records, reserved before the run (no
    /// reallocation inside an exit that hiding must account for).
    pub fn reserve(&mut self, exits: usize) {
        if self.shaping != Shaping::None {
            self.exits.reserve(exits.max(KEPT_PER_KIND));
        }
    }

    /// What it did at each exit.
    pub fn exits(&self) -> &ShapedExits {
        &self.exits
    }
}

impl ExitPolicy for Latency {
    /// Opens TSC moves, once, before the vCPU runs.
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        if self.shaping.moves_tsc() {
            self.tsc_method = Some(vcpu.enable_tsc_moves()?);
        }
        Ok(())
    }

    /// After the answer is in the registers: spin, or move the TSC.
    fn cpuid_answered(&mut self, vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        if self.shaping == Shaping::None {
            return Ok(());
        }
        let handler = vcpu.now().saturating_sub(exit_tsc);
        let delta = match &self.shaping {
            Shaping::None => 0,
            Shaping::Inject { cycles } => {
                plan::spin_until(vcpu.now(), *cycles, || vcpu.now(), || vcpu.past_deadline());
                0
            }
            Shaping::VirtualInject { cycles } => i64::try_from(*cycles).unwrap_or(i64::MAX),
            Shaping::CalibrateResidue => CALIBRATION_MOVE as i64,
            Shaping::Hide { .. } => plan::hide_adjustment(self.target, handler, self.residue_lower_bound),
            Shaping::Profile { profile, .. } => {
                let target = profile.distribution.sample(&mut self.rng);
                plan::hide_adjustment(target, handler, self.residue_lower_bound)
            }
        };
        self.exits.record(handler, delta);
        if self.shaping.moves_tsc() {
            vcpu.move_tsc(delta)?;
        }
        Ok(())
    }

    fn record(&self, into: &mut PolicyRecord) {
        into.shaped = self.exits.clone();
        into.tsc_method = self.tsc_method;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_runs_more_cpuids_than_expected_cannot_grow_the_records() {
        use crate::vm::accounting::KEPT_PER_KIND;
        let mut exits = ShapedExits::default();
        for i in 0..(KEPT_PER_KIND as u64 * 3) {
            exits.record(i, -(i as i64));
        }
        assert_eq!(exits.count(), KEPT_PER_KIND as u64 * 3);
        assert_eq!(exits.handler_cycles().len(), KEPT_PER_KIND);
        // Pairs stay pairs, and the sample reaches the later exits.
        assert!(exits
            .handler_cycles()
            .iter()
            .zip(&exits.moves())
            .all(|(&h, &m)| m == -(h as i64)));
        assert!(exits.handler_cycles().iter().any(|&h| h >= KEPT_PER_KIND as u64 * 2));
    }
    use crate::vm::vcpu::sim::SimVcpu;

    /// One exit on a simulated vCPU: the kernel's part before the handler runs, then
    /// `handler` cycles of VMM work, then the shaper. Returns what the guest's two
    /// timestamps around the CPUID read.
    fn exit(vcpu: &mut SimVcpu, shaper: &mut Latency, kernel: u64, handler: u64) -> i64 {
        let before = vcpu.guest_tsc();
        vcpu.advance(kernel);
        let exit_tsc = vcpu.host_tsc.get();
        vcpu.advance(handler);
        shaper.cpuid_answered(vcpu, exit_tsc).unwrap();
        vcpu.guest_tsc() - before
    }

    #[test]
    fn hide_takes_back_exactly_the_provable_part() {
        let mut vcpu = SimVcpu::new();
        vcpu.clock_step = 3;
        let mut shaper = Latency::new(Shaping::Hide { target: None }, 60, 4_000);
        shaper.arm(&mut vcpu).unwrap();
        for (kernel, handler) in [(4_000, 700), (4_900, 20_000), (4_000, 150)] {
            let seen = exit(&mut vcpu, &mut shaper, kernel, handler);
            assert_eq!(seen, 60 + (kernel as i64 - 4_000), "kernel {kernel} handler {handler}");
        }
        assert_eq!(shaper.exits().moves().len(), 3);
        assert!(shaper.exits().moves().iter().all(|&m| m < 0));
    }

    #[test]
    fn virtual_inject_moves_forward_and_inject_spins_on_the_vcpus_clock() {
        let mut vcpu = SimVcpu::new();
        let mut shaper = Latency::new(Shaping::VirtualInject { cycles: 1_000_000 }, 0, 0);
        shaper.arm(&mut vcpu).unwrap();
        assert_eq!(exit(&mut vcpu, &mut shaper, 5_000, 1_000), 1_006_000);

        let mut vcpu = SimVcpu::new();
        vcpu.clock_step = 100;
        let mut shaper = Latency::new(Shaping::Inject { cycles: 10_000 }, 0, 0);
        shaper.arm(&mut vcpu).unwrap();
        let seen = exit(&mut vcpu, &mut shaper, 5_000, 1_000);
        assert!((16_000..16_500).contains(&seen), "{seen}");
        assert_eq!(vcpu.tsc_moves, None, "inject never touches the TSC");
    }

    #[test]
    fn a_profile_draws_each_target_and_never_undercuts_it() {
        let profile = Profile {
            name: "p".into(),
            description: String::new(),
            sources: vec![],
            distribution: crate::shaping::profile::Distribution::Empirical {
                cycles: vec![1_000, 2_000, 3_000],
            },
            ground_truth: None,
        };
        let mut vcpu = SimVcpu::new();
        let mut shaper = Latency::new(
            Shaping::Profile {
                profile: Box::new(profile),
                seed: 9,
            },
            0,
            10_000,
        );
        shaper.arm(&mut vcpu).unwrap();
        let seen: Vec<i64> = (0..50).map(|i| exit(&mut vcpu, &mut shaper, 10_000 + i, 777)).collect();
        assert!(seen.iter().all(|&s| s >= 1_000));
        assert!(seen.iter().any(|&s| s < 2_000) && seen.iter().any(|&s| s >= 3_000));
    }

    #[test]
    fn no_shaping_does_nothing_and_records_nothing() {
        let mut vcpu = SimVcpu::new();
        let mut shaper = Latency::none();
        shaper.arm(&mut vcpu).unwrap();
        assert_eq!(exit(&mut vcpu, &mut shaper, 5_000, 1_000), 6_000);
        assert!(shaper.exits().moves().is_empty());
    }
}
