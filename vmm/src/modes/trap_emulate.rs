//! Trap-and-emulate: CPUID traps to this VMM, which answers it from the vCPU's CPUID table,
//! writes RAX–RDX, moves RIP past the instruction and resumes the guest — what a classic
//! trap-and-emulate hypervisor does with a sensitive instruction.
//!
//! KVM answers CPUID in the kernel and never exits to userspace for it, so the trap is
//! made one of two ways (`--trap`):
//! - `hw-breakpoint`: an execution breakpoint in DR0–DR3 on each CPUID site, armed with
//!   KVM_SET_GUEST_DEBUG. It fires *before* the instruction runs (a debug exit, vector 1)
//!   and leaves the guest's code untouched.
//! - `int3-patch`: the VMM overwrites each `0f a2` with `cc 90` (int3; nop) and takes the
//!   #BP (vector 3). The classic code-patching approach — and a trace the guest can find
//!   by reading its own code. An emulating KVM cannot run INT in long mode at all and
//!   reports the `int3` as an emulation failure at the site; that is the same trap,
//!   delivered differently, and is handled the same way.

use super::{answer_cpuid, CpuidExitHandler, GuestContext, ModeError};
use crate::shaping::Shaper;
use crate::vm::exits::ExitKind;
use guest_payload::timing::{CPUID_OPCODE, CPUID_SITE_SYMBOLS};
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

/// x86 has four debug address registers, DR0–DR3.
pub const DEBUG_ADDRESS_REGISTERS: usize = 4;
/// What replaces CPUID at a patched site: `int3; nop`, the same length.
pub const INT3_PATCH: [u8; 2] = [0xcc, 0x90];
const DEBUG_VECTOR: u32 = 1;
const BREAKPOINT_VECTOR: u32 = 3;
/// DR7 bit 10 reads as one.
const DR7_FIXED: u64 = 1 << 10;

/// The `--trap` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trap {
    /// Debug-register execution breakpoints on the CPUID sites; the code is untouched.
    #[default]
    HwBreakpoint,
    /// Patch each CPUID into `int3; nop` and handle the breakpoint exception.
    Int3Patch,
}

impl Trap {
    pub const fn name(self) -> &'static str {
        match self {
            Trap::HwBreakpoint => "hw-breakpoint",
            Trap::Int3Patch => "int3-patch",
        }
    }
}

/// How the trap reached the VMM on this KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrapDelivery {
    /// KVM_EXIT_DEBUG, as hardware KVM delivers both kinds of trap.
    DebugExit,
    /// KVM_EXIT_INTERNAL_ERROR (emulation failure) at a patched `int3`: an emulating KVM.
    EmulationFailure,
}

pub struct TrapEmulate {
    trap: Trap,
    sites: Vec<u64>,
    shaper: Shaper,
    /// How the traps arrived (the first one decides).
    pub delivery: Option<TrapDelivery>,
}

impl TrapEmulate {
    pub fn new(trap: Trap, shaper: Shaper) -> Self {
        Self {
            trap,
            sites: Vec::new(),
            shaper,
            delivery: None,
        }
    }

    /// The site a trap at `pc` belongs to. A #BP may report the address after the int3.
    fn site_of(&self, pc: u64) -> Option<u64> {
        self.sites
            .iter()
            .copied()
            .find(|&site| pc == site || (self.trap == Trap::Int3Patch && pc == site + 1))
    }

    fn emulate(
        &mut self,
        guest: &GuestContext,
        site: u64,
        delivery: TrapDelivery,
        exit_tsc: u64,
    ) -> Result<ExitKind, ModeError> {
        let mut regs = guest.vcpu.get_regs().map_err(|source| ModeError::Kvm {
            what: "KVM_GET_REGS",
            source,
        })?;
        if regs.rip != site {
            // Put RIP on the site so that answering it moves RIP past the 2-byte patch.
            regs.rip = site;
            guest.vcpu.set_regs(&regs).map_err(|source| ModeError::Kvm {
                what: "KVM_SET_REGS",
                source,
            })?;
        }
        answer_cpuid(guest, CPUID_OPCODE.len() as u64)?;
        self.delivery.get_or_insert(delivery);
        self.shaper.after_exit(guest.vcpu, exit_tsc)?;
        // The first site is the timed probe; the others answer the guest's snapshot.
        Ok(if Some(&site) == self.sites.first() {
            ExitKind::CpuidTrap
        } else {
            ExitKind::CpuidQueryTrap
        })
    }
}

impl CpuidExitHandler for TrapEmulate {
    fn shaper(&self) -> Option<&Shaper> {
        Some(&self.shaper)
    }

    fn arm(&mut self, guest: &GuestContext) -> Result<(), ModeError> {
        self.sites = CPUID_SITE_SYMBOLS
            .iter()
            .map(|&name| guest.payload.symbol(name).ok_or(ModeError::MissingSite(name)))
            .collect::<Result<_, _>>()?;
        for &site in &self.sites {
            let mut found = [0u8; 2];
            guest
                .memory
                .read_slice(&mut found, GuestAddress(site))
                .map_err(|source| ModeError::Memory { addr: site, source })?;
            if found != CPUID_OPCODE {
                return Err(ModeError::NotCpuid { addr: site, found });
            }
        }
        let mut debug = kvm_guest_debug::default();
        match self.trap {
            Trap::HwBreakpoint => {
                if self.sites.len() > DEBUG_ADDRESS_REGISTERS {
                    return Err(ModeError::TooManySites {
                        sites: self.sites.len(),
                        slots: DEBUG_ADDRESS_REGISTERS,
                    });
                }
                debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
                debug.arch.debugreg[7] = DR7_FIXED;
                for (slot, &site) in self.sites.iter().enumerate() {
                    debug.arch.debugreg[slot] = site;
                    // Global enable for this slot; R/W and LEN zero: break on execution.
                    debug.arch.debugreg[7] |= 1 << (2 * slot + 1);
                }
            }
            Trap::Int3Patch => {
                for &site in &self.sites {
                    guest
                        .memory
                        .write_slice(&INT3_PATCH, GuestAddress(site))
                        .map_err(|source| ModeError::Memory { addr: site, source })?;
                }
                debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
            }
        }
        guest.vcpu.set_guest_debug(&debug).map_err(|source| ModeError::Kvm {
            what: "KVM_SET_GUEST_DEBUG",
            source,
        })?;
        Ok(self.shaper.arm(guest.vcpu)?)
    }

    fn on_debug(
        &mut self,
        guest: &GuestContext,
        exit: &kvm_debug_exit_arch,
        exit_tsc: u64,
    ) -> Result<ExitKind, ModeError> {
        let expected_vector = match self.trap {
            Trap::HwBreakpoint => DEBUG_VECTOR,
            Trap::Int3Patch => BREAKPOINT_VECTOR,
        };
        match self.site_of(exit.pc) {
            Some(site) if exit.exception == expected_vector => {
                self.emulate(guest, site, TrapDelivery::DebugExit, exit_tsc)
            }
            _ => Err(ModeError::UnexpectedDebugExit {
                rip: exit.pc,
                exception: exit.exception,
            }),
        }
    }

    fn on_emulation_failure(
        &mut self,
        guest: &GuestContext,
        rip: u64,
        exit_tsc: u64,
    ) -> Result<Option<ExitKind>, ModeError> {
        if self.trap != Trap::Int3Patch {
            return Ok(None);
        }
        match self.site_of(rip) {
            Some(site) => self
                .emulate(guest, site, TrapDelivery::EmulationFailure, exit_tsc)
                .map(Some),
            None => Ok(None),
        }
    }
}
