//! How CPUID reaches whoever answers it (`--mode`), and the VMM's exit handling per mode.
//!
//! | mode | on `cpuid` | handled by |
//! |---|---|---|
//! | `native` | executes on the host CPU | hardware |
//! | `hw-assist` | VM exit, emulated inside KVM | KVM (userspace never sees it) |
//! | `trap-emulate` | traps to this VMM, emulated from its CPUID table | the VMM |
//! | `paravirt` | the guest asks the VMM by hypercall instead | the VMM |

use crate::arch::x86_64::cpuid::CpuidTable;
use crate::vm::exits::ExitKind;
use crate::vm::loader::Payload;
use kvm_bindings::kvm_debug_exit_arch;
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

pub mod hw_assist;
pub mod paravirt;
pub mod trap_emulate;

/// The `--mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The timing core runs in a pinned host thread: no VM at all.
    Native,
    /// CPUID exits to KVM, which emulates it in the kernel (the ordinary VM case).
    HwAssist,
    /// CPUID traps to this VMM (see --trap), which emulates it from its CPUID table.
    TrapEmulate,
    /// The guest asks this VMM for CPUID with a hypercall (port I/O) instead of executing it.
    Paravirt,
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::HwAssist => "hw-assist",
            Mode::TrapEmulate => "trap-emulate",
            Mode::Paravirt => "paravirt",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("unexpected debug exit at RIP {rip:#x} (exception {exception}): this mode arms no trap there")]
    UnexpectedDebugExit { rip: u64, exception: u32 },
    #[error("the guest used the paravirtual hypercall port, but this mode does not offer it")]
    UnexpectedHypercall,
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the payload has no symbol `{0}`: the VMM finds the CPUID sites by name in the ELF's symbol table")]
    MissingSite(&'static str),
    #[error("the payload has {sites} CPUID sites but x86 has only {slots} debug address registers (DR0-DR3); use --trap int3-patch")]
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
    #[error("{trap} traps are not delivered by this KVM: {why}. trap-emulate is unavailable here; use --mode paravirt, or the other --trap")]
    TrapUnavailable { trap: &'static str, why: String },
    #[error(transparent)]
    Shaping(#[from] crate::shaping::ShapingError),
}

/// What a mode's handler may touch while the vCPU is stopped.
pub struct GuestContext<'a> {
    pub vcpu: &'a VcpuFd,
    pub memory: &'a GuestMemoryMmap,
    /// The table KVM answers CPUID from, read back after setup.
    pub cpuid: &'a CpuidTable,
    pub payload: &'a Payload,
}

/// Answers the CPUID the guest asked for (leaf in EAX, subleaf in ECX) from the vCPU's
/// table, exactly as KVM would, and moves RIP on by `advance_rip` bytes. Returns the RIP
/// the exit stopped at.
pub(crate) fn answer_cpuid(guest: &GuestContext, advance_rip: u64) -> Result<u64, ModeError> {
    let mut regs = guest.vcpu.get_regs().map_err(|source| ModeError::Kvm {
        what: "KVM_GET_REGS",
        source,
    })?;
    let [eax, ebx, ecx, edx] = guest.cpuid.lookup(regs.rax as u32, regs.rcx as u32);
    // CPUID writes 32-bit results, which clear the upper halves in 64-bit mode.
    regs.rax = u64::from(eax);
    regs.rbx = u64::from(ebx);
    regs.rcx = u64::from(ecx);
    regs.rdx = u64::from(edx);
    let rip = regs.rip;
    regs.rip += advance_rip;
    guest.vcpu.set_regs(&regs).map_err(|source| ModeError::Kvm {
        what: "KVM_SET_REGS",
        source,
    })?;
    Ok(rip)
}

/// The VMM side of a mode: exits that only some modes expect. `exit_tsc` is the host TSC
/// when KVM_RUN returned, for latency shaping.
pub trait CpuidExitHandler {
    /// Called once before the vCPU first runs: arm traps, patch code.
    fn arm(&mut self, _guest: &GuestContext) -> Result<(), ModeError> {
        Ok(())
    }

    /// A debug exit (hardware breakpoint or `int3`): emulate the CPUID it caught, and
    /// say which kind of CPUID exit it was.
    fn on_debug(
        &mut self,
        _guest: &GuestContext,
        exit: &kvm_debug_exit_arch,
        _exit_tsc: u64,
    ) -> Result<ExitKind, ModeError> {
        Err(ModeError::UnexpectedDebugExit {
            rip: exit.pc,
            exception: exit.exception,
        })
    }

    /// An `out` to the hypercall port: answer the CPUID it asks for.
    fn on_hypercall(&mut self, _guest: &GuestContext, _exit_tsc: u64) -> Result<ExitKind, ModeError> {
        Err(ModeError::UnexpectedHypercall)
    }

    /// The shaper of a mode that shapes its exits, for what it learnt during the run.
    fn shaper(&self) -> Option<&crate::shaping::Shaper> {
        None
    }

    /// KVM could not emulate the instruction at `rip`. An emulating KVM reports a patched
    /// `int3` this way (its emulator cannot run INT in long mode): returns the exit's kind
    /// if this was one of ours and has been handled as the trap.
    fn on_emulation_failure(
        &mut self,
        _guest: &GuestContext,
        _rip: u64,
        _exit_tsc: u64,
    ) -> Result<Option<ExitKind>, ModeError> {
        Ok(None)
    }
}
