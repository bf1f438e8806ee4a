//! What an evasion is to the registry: its name, what it needs of a run, what it is
//! modelled on, and the policy it becomes. Each evasion defines its [`EvasionKind`] in a
//! file of its own; `registry.rs` lists them.

use super::policy::ExitPolicy;
use crate::remedy::Remedy;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvasionError {
    #[error("unknown evasion {given:?}: expected {expected}")]
    Unknown { given: String, expected: String },
    #[error("the evasion {0} acts on the counter vCPU, and the run has none")]
    NeedsCounter(String),
    #[error("the evasion {0} acts while the VMM handles CPUID exits, and on this path it never sees them")]
    NeedsVmmExits(String),
    #[error("the evasion {0} shares the TSC moves of latency shaping, and the run's shaping makes none")]
    NothingToShare(String),
    #[error("the evasion {name}:{value}: {why}")]
    Argument {
        name: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("the evasion {0} acts on the guest (its TSC or its CPUID), and a native run has no guest: give a VM path (--mode hw-assist, trap-emulate or paravirt)")]
    NeedsGuest(String),
    #[error(
        "the evasion {0} answers the guest's TSC reads from a clock of its own, which TSC offset moves \
         (--hide, --virtual-inject-cycles, --profile) do not reach: give one or the other"
    )]
    ClockAndOffset(String),
    #[error("the evasion {name} needs TSC scaling, and this KVM ({flavour}) does not offer KVM_CAP_TSC_CONTROL: it cannot run here")]
    NoTscControl { name: String, flavour: &'static str },
    #[error(
        "the evader {name} moves the TSC offset, and this KVM ({flavour}) ignores offset writes: run it on a KVM \
         that honours them (hardware VT-x/AMD-V, or ../shared/nested-svm/run){trapped}"
    )]
    OffsetIgnored {
        name: String,
        flavour: &'static str,
        /// `, or ...`: the zoo's same clock through the RDTSC trap, where it has one.
        trapped: String,
    },
    #[error("one evader per run: {first} and {second} were both given")]
    TwoEvaders { first: String, second: String },
    #[error(transparent)]
    Evader(#[from] super::evader::EvaderError),
}

impl EvasionError {
    /// What the run can be given instead, where something can.
    pub fn remedy(&self) -> Option<Remedy> {
        match self {
            EvasionError::NeedsCounter(_) => Some(Remedy::TwoVcpus),
            EvasionError::NeedsVmmExits(_) => Some(Remedy::VmmPath),
            EvasionError::NothingToShare(_) => Some(Remedy::TscShaping),
            _ => None,
        }
    }
}

/// What an evasion needs of a run before it can act.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// A counter vCPU (`--vcpus 2`).
    pub counter: bool,
    /// CPUID exits this VMM handles (trap-emulate, paravirt).
    pub vmm_exits: bool,
    /// Latency shaping that moves the TSC (something to share).
    pub tsc_moves: bool,
    /// KVM_CAP_TSC_CONTROL.
    pub tsc_control: bool,
    /// The guest's RDTSC and RDTSCP trapped to the VMM, which answers them from the
    /// policy's clock (`modes/tsc_trap.rs`).
    pub tsc_trap: bool,
    /// MSR reads (IA32_TSC, APERF, MPERF, TSC_AUX) filtered to the VMM
    /// (KVM_CAP_X86_USER_SPACE_MSR); where not, KVM answers them.
    pub msr: bool,
    /// Moves vCPU 0's TSC offset at each entry (a KVM must honour offset writes).
    pub moves_offset: bool,
    /// A guest, on any VM path: it changes what KVM's CPUID table says.
    pub guest: bool,
}

impl Needs {
    /// Nothing: each evasion names only what it does need (`..Needs::NONE`).
    pub const NONE: Needs = Needs {
        counter: false,
        vmm_exits: false,
        tsc_moves: false,
        tsc_control: false,
        tsc_trap: false,
        msr: false,
        moves_offset: false,
        guest: false,
    };
}

/// One evasion, as the registry knows it.
#[derive(Debug)]
pub struct EvasionKind {
    pub name: &'static str,
    /// What `NAME:ARG`'s argument is, where it takes one (it then must have one).
    pub argument: Option<&'static str>,
    /// What the VMM does.
    pub does: &'static str,
    /// What it is modelled on.
    pub as_in: &'static str,
    pub needs: Needs,
    /// Checks the argument's value.
    pub check: fn(u64) -> Result<(), &'static str>,
    /// The policy it becomes.
    pub build: fn(Option<u64>) -> Box<dyn ExitPolicy>,
}
