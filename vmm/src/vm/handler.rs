//! The contract between the run loop and whoever handles exits (`crate::modes`): the run
//! loop knows no mode; it hands each exit over and does what the [`Flow`] says.

use super::exit::Exit;
use super::vcpu::Vcpu;

/// What the run loop does after a handler looked at an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Handled: count it as this kind and re-enter the guest.
    Continue(ExitKind),
    /// The guest rang "done" with this status.
    Done { status: u32 },
    /// Not an exit the handler takes: the run ends with an error naming it.
    Fatal,
}

/// Whoever handles a VM's exits (the modes, in `crate::modes`). The run loop knows no
/// mode: it hands each exit over and does what the [`Flow`] says.
pub trait ExitHandler: Send {
    /// The handler's own error, which the run returns whole ([`super::RunError::Handler`]).
    type Error: std::error::Error + Send + Sync + 'static;
    /// Called once before the vCPU first runs: arm traps, patch code, open TSC moves.
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), Self::Error>;
    /// One exit; `exit_tsc` is the host TSC read as KVM_RUN returned.
    fn handle(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, exit_tsc: u64) -> Result<Flow, Self::Error>;
}

/// Why KVM_RUN returned, in the words the reports use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    /// A CPUID the VMM emulated after a trap (debug exit at a CPUID site).
    CpuidTrap,
    /// A paravirtual CPUID hypercall on the hypercall port.
    CpuidHypercall,
    /// A trapped CPUID of the guest's snapshot of its CPUID leaves (not a timed sample).
    CpuidQueryTrap,
    /// A hypercall of the guest's CPUID snapshot (not a timed sample).
    CpuidQueryHypercall,
    /// A trapped RDTSC or RDTSCP, answered from the run's virtual clock.
    TscTrap,
    /// A filtered read of IA32_TSC (MSR 0x10), answered from the same clock.
    MsrTrap,
    /// A read of the PM timer port (the guest's wall clock).
    PmTimer,
    /// A byte of console output.
    Console,
    /// The guest rang the done port.
    Done,
    /// KVM_RUN interrupted by a signal (the watchdog's kick).
    Signal,
    /// The guest's own #DB or #BP (a single step of its own, an INT3 it placed), which
    /// the VMM's guest debugging caught and gave back to the guest.
    GuestException,
}

impl ExitKind {
    pub const fn name(self) -> &'static str {
        match self {
            ExitKind::CpuidTrap => "cpuid-trap",
            ExitKind::CpuidHypercall => "cpuid-hypercall",
            ExitKind::CpuidQueryTrap => "cpuid-query-trap",
            ExitKind::CpuidQueryHypercall => "cpuid-query-hypercall",
            ExitKind::TscTrap => "tsc-trap",
            ExitKind::MsrTrap => "msr-trap",
            ExitKind::PmTimer => "pm-timer-io",
            ExitKind::Console => "console-io",
            ExitKind::Done => "done-io",
            ExitKind::Signal => "signal",
            ExitKind::GuestException => "guest-exception-reflected",
        }
    }
}
