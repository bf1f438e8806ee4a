//! How CPUID reaches whoever answers it (`--mode`), and the VMM's exit handling per mode.
//!
//! | mode | on `cpuid` | handled by |
//! |---|---|---|
//! | `native` | executes on the host CPU | hardware |
//! | `hw-assist` | VM exit, emulated inside KVM | KVM (userspace never sees it) |
//! | `trap-emulate` | traps to this VMM, emulated from its CPUID table | the VMM |
//! | `paravirt` | the guest asks the VMM by hypercall instead | the VMM |

use crate::arch::x86_64::cpuid::CpuidTable;
use crate::vm::loader::Payload;
use kvm_bindings::kvm_debug_exit_arch;
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

pub mod hw_assist;

/// The `--mode` values.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The timing core runs in a pinned host thread: no VM at all.
    Native,
    /// CPUID exits to KVM, which emulates it in the kernel (the ordinary VM case).
    HwAssist,
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::HwAssist => "hw-assist",
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
    #[error(
        "unexpected debug exit at RIP {rip:#x} (exception {exception}): this mode arms no trap"
    )]
    UnexpectedDebugExit { rip: u64, exception: u32 },
    #[error("the guest used the paravirtual hypercall port, but this mode does not offer it")]
    UnexpectedHypercall,
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// What a mode's handler may touch while the vCPU is stopped.
pub struct GuestContext<'a> {
    pub vcpu: &'a VcpuFd,
    pub memory: &'a GuestMemoryMmap,
    /// The table KVM answers CPUID from, read back after setup.
    pub cpuid: &'a CpuidTable,
    pub payload: &'a Payload,
}

/// The VMM side of a mode: exits that only some modes expect.
pub trait CpuidExitHandler {
    /// Called once before the vCPU first runs: arm traps, patch code.
    fn arm(&mut self, _guest: &GuestContext) -> Result<(), ModeError> {
        Ok(())
    }

    /// A debug exit (hardware breakpoint or `int3`): emulate the CPUID it caught.
    fn on_debug(
        &mut self,
        _guest: &GuestContext,
        exit: &kvm_debug_exit_arch,
    ) -> Result<(), ModeError> {
        Err(ModeError::UnexpectedDebugExit {
            rip: exit.pc,
            exception: exit.exception,
        })
    }

    /// An `out` to the hypercall port: answer the CPUID it asks for.
    fn on_hypercall(&mut self, _guest: &GuestContext) -> Result<(), ModeError> {
        Err(ModeError::UnexpectedHypercall)
    }
}
