//! The modes' side of an exit: who answers a CPUID that reached this VMM, and with what.

use crate::arch::x86_64::cpuid::CpuidTable;
use crate::shaping::ShapingError;
use crate::vm::exit::Exit;
use crate::vm::handler::ExitKind;
use crate::vm::vcpu::{Vcpu, VcpuError};
use kvm_bindings::kvm_regs;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("unexpected debug exit at RIP {rip:#x} (exception {exception}): this mode arms no trap there")]
    UnexpectedDebugExit { rip: u64, exception: u32 },
    #[error("the guest used the paravirtual hypercall port, but this mode does not offer it")]
    UnexpectedHypercall,
    #[error("the guest wrote to the io-patch trap port {port:#x} at RIP {rip:#x}, where this VMM patched no CPUID")]
    UnexpectedIoTrap { port: u16, rip: u64 },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("the payload's code holds no CPUID instruction: trap-emulate has nothing to trap")]
    NoCpuidSites,
    #[error("the payload has {sites} CPUID sites but x86 has only {slots} debug address registers (DR0-DR3)")]
    TooManySites { sites: usize, slots: usize },
    #[error(
        "the bytes at CPUID site {addr:#x} are {found:02x?}, not CPUID (0f a2): the payload does not match its symbols"
    )]
    NotCpuid { addr: u64, found: [u8; 2] },
    #[error("cannot access guest memory at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{trap} traps are not delivered by this KVM: {why}")]
    TrapUnavailable { trap: &'static str, why: String },
    #[error("the payload made no paravirtual hypercall (port {port:#x}): it is not enlightened for paravirt, so this run would measure nothing of that path")]
    NoHypercalls { port: u16 },
    #[error("the payload's timed CPUID never trapped to the VMM ({exits} trap exits): trap-emulate measured nothing of its path")]
    NoTraps { exits: u64 },
    #[error(
        "the bytes at {instruction} site {addr:#x} are {found:02x?}, not {instruction}: the payload does not match its decoding"
    )]
    NotTscRead {
        instruction: &'static str,
        addr: u64,
        found: Vec<u8>,
    },
    #[error("the guest wrote to the RDTSC trap port {port:#x} at RIP {rip:#x}, where this VMM patched no TSC read")]
    UnexpectedTscTrap { port: u8, rip: u64 },
    #[error("the evasion traps RDTSC, and the payload's code holds no RDTSC or RDTSCP: there is nothing to trap")]
    NoTscSites,
    #[error(
        "--tsc-trap hw-breakpoint: the evasion traps {sites} RDTSC/RDTSCP site(s) and {free} of the four debug \
         address registers (DR0-DR3) are free{cpuid}: use --tsc-trap io-patch, which traps any number"
    )]
    TooManyTscSites {
        sites: usize,
        free: usize,
        /// `, after the CPUID trap's N`, where --trap hw-breakpoint took some.
        cpuid: String,
    },
    #[error("--tsc-trap hw-breakpoint: this KVM does not deliver debug-register breakpoints ({why}): use --tsc-trap io-patch, which every KVM delivers")]
    TscBreakpointsUnavailable { why: String },
    #[error(transparent)]
    Shaping(#[from] ShapingError),
}

impl ModeError {
    /// What the run can be given instead, where something can.
    pub fn remedy(&self) -> Option<crate::remedy::Remedy> {
        use crate::remedy::Remedy;
        match self {
            ModeError::TooManySites { .. } => Some(Remedy::PatchingTrap),
            ModeError::TrapUnavailable { .. } => Some(Remedy::PortIoTrap),
            ModeError::Shaping(error) => error.remedy(),
            _ => None,
        }
    }
}

/// Answers the CPUID in `regs` (leaf in EAX, subleaf in ECX) from `table`, exactly as KVM
/// would: CPUID writes 32-bit results, which clear the upper halves in 64-bit mode.
pub fn answer_cpuid(table: &CpuidTable, regs: &mut kvm_regs) {
    let [eax, ebx, ecx, edx] = table.lookup(regs.rax as u32, regs.rcx as u32);
    regs.rax = u64::from(eax);
    regs.rbx = u64::from(ebx);
    regs.rcx = u64::from(ecx);
    regs.rdx = u64::from(edx);
}

/// A CPUID this VMM answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    /// How the reports count it (a timed CPUID, or one of the guest's snapshot).
    pub kind: ExitKind,
    /// False for the benches' bare exits: stepped over, unanswered, and shaped by no policy.
    pub shaped: bool,
}

/// The VMM side of a mode: who answers the CPUIDs that reach this VMM.
pub trait Answerer: Send {
    /// Called once before the vCPU first runs: arm traps, patch code.
    fn arm(&mut self, _vcpu: &mut dyn Vcpu) -> Result<(), ModeError> {
        Ok(())
    }

    /// Answers `exit` if it is one of this mode's CPUIDs (the answer in the registers,
    /// RIP past the instruction where KVM does not move it); `None` for any other exit,
    /// which [`ExitPath`] then refuses by name.
    fn answer(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit) -> Result<Option<Answered>, ModeError>;

    /// How this mode's traps reached the VMM, where it traps.
    fn delivery(&self) -> Option<TrapDelivery> {
        None
    }

    /// The guest debug state this mode armed (its breakpoints), where it armed one: the
    /// RDTSC trap's breakpoints share DR0-DR3 with it.
    fn guest_debug(&self) -> Option<kvm_bindings::kvm_guest_debug> {
        None
    }
}

/// How the trap reached the VMM on this KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrapDelivery {
    /// KVM_EXIT_DEBUG, as hardware KVM delivers breakpoints and `int3`.
    DebugExit,
    /// KVM_EXIT_INTERNAL_ERROR (emulation failure) at a patched `int3`: an emulating KVM.
    EmulationFailure,
    /// KVM_EXIT_IO at a patched `out`.
    PortIo,
}

impl TrapDelivery {
    pub const fn describe(self) -> &'static str {
        match self {
            TrapDelivery::DebugExit => "as debug exits (KVM_EXIT_DEBUG)",
            TrapDelivery::EmulationFailure => {
                "as emulation failures at the patched int3 (this KVM emulates guest instructions)"
            }
            TrapDelivery::PortIo => "as port I/O exits (KVM_EXIT_IO) at the patched out",
        }
    }
}
