//! What an exit costs the guest: the per-vCPU policy of a hypervisor that wants to look
//! like something it is not.
//!
//! An [`ExitPolicy`] is told of each exit vCPU 0 takes to this VMM — as it begins, once a
//! CPUID was answered, as it ends — and may move the clocks the guest can read: the vCPU's
//! TSC offset, the counter vCPU (pause it, share a TSC move with it), the whole VM's TSC
//! rate before the run. Modes decide who answers CPUID (`crate::modes`); policies decide
//! what that costs, and nothing else does. Every policy runs on the `Vcpu` trait, so each
//! is unit-tested on `SimVcpu` with a simulated clock.
//!
//! The policies:
//! - [`latency::Latency`]: inject, virtual inject, hide, profiles (`--inject-*`, `--hide`,
//!   `--profile`);
//! - the evasions of [`evasion::EVASIONS`] (`--evade NAME`), one file each:
//!   [`pause_counter`], [`shared_offset`], [`tsc_khz`].
//!
//! Adding an evader is a new file here with an [`evasion::EvasionKind`] and one line in
//! the registry. What a run's shaping was compared with ([`outcome`]) and what its report
//! says ([`report`]) are data; the calibration runs that produce them are `measure`'s.

pub mod evasion;
pub mod latency;
pub mod outcome;
pub mod pause_counter;
pub mod plan;
pub mod profile;
pub mod report;
pub mod shared_offset;
pub mod tsc_khz;

use crate::vm::tsc::TscMethod;
use crate::vm::vcpu::{Vcpu, VcpuError};
use crate::vm::VmSetup;
use latency::ShapedExits;

#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    #[error("cannot move the guest TSC: {0}")]
    Vcpu(#[from] VcpuError),
    #[error(
        "TSC moves are not honoured by this KVM ({flavour}): a {requested}-cycle move through {method:?} \
         left the guest-seen cost at {seen} cycles, so --hide, --virtual-inject-cycles and --profile cannot work here. \
         They need a KVM that applies TSC offset writes (hardware VT-x/AMD-V KVM, or ../shared/nested-svm/run)"
    )]
    NotHonoured {
        flavour: &'static str,
        method: TscMethod,
        requested: u64,
        seen: i64,
    },
    #[error("{0} shapes exits the VMM handles: use --mode trap-emulate or --mode paravirt")]
    NeedsVmmExits(&'static str),
    #[error("{0} shapes the CPUID probe's exits, and --probes leaves it out: add cpuid to --probes")]
    NeedsCpuidProbe(&'static str),
    #[error("{0} acts on the counter vCPU, and this run has none")]
    NoCounter(&'static str),
    #[error(transparent)]
    Counter(#[from] crate::vm::counter::CounterError),
    #[error("cannot set the VM up for {policy}: {source}")]
    Setup {
        policy: &'static str,
        source: Box<crate::vm::VmError>,
    },
}

/// The per-vCPU policy of a hypervisor that wants to look like something it is not: hooks
/// for the exits it may act on, with the clocks it may move. Every hook has a default that
/// does nothing, so a policy says only what it does.
pub trait ExitPolicy: Send {
    /// Before the vCPUs run, on the VMM's own thread: whole-VM settings (the TSC rate,
    /// TSC moves on the counter vCPU).
    fn prepare(&mut self, _vm: &mut dyn VmSetup) -> Result<(), ShapingError> {
        Ok(())
    }

    /// Once on vCPU 0's thread, before it first runs: open TSC moves.
    fn arm(&mut self, _vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        Ok(())
    }

    /// vCPU 0 has left the guest for this VMM (any exit but the end of the run).
    fn exit_began(&mut self, _vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        Ok(())
    }

    /// A trapped or hypercalled CPUID was answered, its registers set; `exit_tsc` is the
    /// host TSC when KVM_RUN returned. What the exit costs the guest is decided here.
    fn cpuid_answered(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        Ok(())
    }

    /// The exit is over, its registers written back; the guest re-enters next.
    fn exit_ended(&mut self, _vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        Ok(())
    }

    /// What it did, for the run's report.
    fn record(&self, _into: &mut PolicyRecord) {}
}

/// What the policies of a run did, for its report.
#[derive(Clone, Debug, Default)]
pub struct PolicyRecord {
    /// What latency shaping did at each CPUID exit.
    pub shaped: ShapedExits,
    /// How the run moved vCPU 0's TSC, where it did.
    pub tsc_method: Option<TscMethod>,
}

/// A run's policies as one: each told of an exit in order as it begins and is answered,
/// in reverse order as it ends (the first to pause the counter is the last to resume it).
#[derive(Default)]
pub struct Policies(Vec<Box<dyn ExitPolicy>>);

impl Policies {
    pub fn new(policies: Vec<Box<dyn ExitPolicy>>) -> Self {
        Self(policies)
    }

    /// No policy: every exit costs what it costs.
    pub fn none() -> Self {
        Self::default()
    }

    /// What they did, together.
    pub fn recorded(&self) -> PolicyRecord {
        let mut record = PolicyRecord::default();
        self.record(&mut record);
        record
    }
}

impl ExitPolicy for Policies {
    fn prepare(&mut self, vm: &mut dyn VmSetup) -> Result<(), ShapingError> {
        self.0.iter_mut().try_for_each(|p| p.prepare(vm))
    }

    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        self.0.iter_mut().try_for_each(|p| p.arm(vcpu))
    }

    fn exit_began(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        self.0.iter_mut().try_for_each(|p| p.exit_began(vcpu))
    }

    fn cpuid_answered(&mut self, vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        self.0.iter_mut().try_for_each(|p| p.cpuid_answered(vcpu, exit_tsc))
    }

    /// Every policy is told, even after one failed (a paused counter must be let go);
    /// the first error is returned.
    fn exit_ended(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        let mut first = Ok(());
        for policy in self.0.iter_mut().rev() {
            let ended = policy.exit_ended(vcpu);
            if first.is_ok() {
                first = ended;
            }
        }
        first
    }

    fn record(&self, into: &mut PolicyRecord) {
        self.0.iter().for_each(|p| p.record(into));
    }
}
