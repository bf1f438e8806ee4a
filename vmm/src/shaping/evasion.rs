//! What an evasion is to the registry: its name, what it needs of a run, what it is
//! modelled on, and the policy it becomes. Each evasion defines its [`EvasionKind`] in a
//! file of its own; `registry.rs` lists them.

use super::policy::ExitPolicy;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvasionError {
    #[error("unknown evasion {given:?}: expected {expected}")]
    Unknown { given: String, expected: String },
    #[error("--evade {0} acts on the counter vCPU: add --vcpus 2")]
    NeedsCounter(&'static str),
    #[error("--evade {0} acts while the VMM handles CPUID exits, and on this path it never sees them: use --mode trap-emulate or --mode paravirt")]
    NeedsVmmExits(&'static str),
    #[error("--evade {0} shares the TSC moves of --hide, --virtual-inject-cycles or --profile, and none is given")]
    NothingToShare(&'static str),
    #[error("--evade {name}:{value}: {why}")]
    Argument {
        name: &'static str,
        value: u64,
        why: &'static str,
    },
    #[error("--evade {name} needs TSC scaling, and this KVM ({flavour}) does not offer KVM_CAP_TSC_CONTROL: it cannot run here")]
    NoTscControl { name: &'static str, flavour: &'static str },
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
