//! The interface every shaping policy implements, and their composition.

use crate::stats::Reservoir;
use crate::vm::accounting::KEPT_PER_KIND;
use crate::vm::tsc::TscMethod;
use crate::vm::vcpu::{Vcpu, VcpuError};
use crate::vm::VmSetup;

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
    #[error("{0} shapes exits the VMM handles, and on this path it sees none")]
    NeedsVmmExits(&'static str),
    #[error("{0} shapes the CPUID probe's exits, and the run leaves that probe out")]
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

impl ShapingError {
    /// What the run can be given instead, where something can.
    pub fn remedy(&self) -> Option<crate::remedy::Remedy> {
        use crate::remedy::Remedy;
        match self {
            ShapingError::NeedsVmmExits(_) => Some(Remedy::VmmPath),
            ShapingError::NeedsCpuidProbe(_) => Some(Remedy::CpuidProbe),
            _ => None,
        }
    }
}

/// Which instruction a trapped TSC read was (originals often trap one and not the other).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscRead {
    Rdtsc,
    Rdtscp,
    /// RDMSR of IA32_TSC (0x10), for an evasion whose [`super::evasion::Needs`] intercept it.
    Msr,
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

    /// vCPU 0 has left the guest for this VMM (any exit but the end of the run);
    /// `exit_tsc` is the host TSC when KVM_RUN returned.
    fn exit_began(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        Ok(())
    }

    /// A trapped RDTSC, RDTSCP or read of MSR 0x10 (a run whose evasion traps them): `read` is what the
    /// guest's TSC would have read as KVM_RUN returned, or what the policy before this one
    /// made of it; the guest is told what this returns.
    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, _instruction: TscRead) -> Result<u64, ShapingError> {
        Ok(read)
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

/// What the shaper did at each CPUID exit it shaped, in order: pairs of (host cycles from
/// KVM_RUN's return to the moment the TSC was moved or the spin began — the part of each
/// exit known exactly —, the TSC move, negative where time was taken back). Beyond what
/// was reserved (the exits the run expects, at least [`KEPT_PER_KIND`]) a uniform sample
/// of pairs, so a guest running more CPUIDs than it was asked for cannot grow the VMM's
/// memory.
#[derive(Clone, Debug)]
pub struct ShapedExits {
    exits: Reservoir<(u64, i64)>,
}

impl Default for ShapedExits {
    fn default() -> Self {
        Self {
            exits: Reservoir::new(KEPT_PER_KIND, 0, 0x5a9e_d0e1),
        }
    }
}

impl ShapedExits {
    pub(super) fn record(&mut self, handler: u64, delta: i64) {
        self.exits.record((handler, delta));
    }

    /// Room for `exits` pairs, reserved before the run.
    pub(super) fn reserve(&mut self, exits: usize) {
        self.exits.grow_to(exits);
    }

    /// Exits shaped in all.
    pub fn count(&self) -> u64 {
        self.exits.count()
    }

    /// The handler cycles of the exits kept.
    pub fn handler_cycles(&self) -> Vec<u64> {
        self.exits.kept().iter().map(|&(h, _)| h).collect()
    }

    /// The TSC moves of the exits kept.
    pub fn moves(&self) -> Vec<i64> {
        self.exits.kept().iter().map(|&(_, m)| m).collect()
    }
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

    fn exit_began(&mut self, vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        self.0.iter_mut().try_for_each(|p| p.exit_began(vcpu, exit_tsc))
    }

    fn tsc_read(&mut self, vcpu: &mut dyn Vcpu, read: u64, instruction: TscRead) -> Result<u64, ShapingError> {
        self.0
            .iter_mut()
            .try_fold(read, |read, p| p.tsc_read(vcpu, read, instruction))
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
