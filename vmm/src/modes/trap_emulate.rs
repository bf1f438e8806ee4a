//! Trap-and-emulate: CPUID traps to this VMM, which answers it from the vCPU's CPUID table,
//! writes RAX–RDX, moves RIP past the instruction and resumes the guest — what a classic
//! trap-and-emulate hypervisor does with a sensitive instruction.
//!
//! KVM answers CPUID in the kernel and never exits to userspace for it, so the trap is
//! made one of three ways (`--trap`):
//! - `hw-breakpoint`: an execution breakpoint in DR0–DR3 on each CPUID site, armed with
//!   KVM_SET_GUEST_DEBUG. It fires *before* the instruction runs (a debug exit, vector 1)
//!   and leaves the guest's code untouched.
//! - `int3-patch`: the VMM overwrites each `0f a2` with `cc 90` (int3; nop) and takes the
//!   #BP (vector 3). An emulating KVM cannot run INT in long mode at all and reports the
//!   `int3` as an emulation failure at the site; that is the same trap, delivered
//!   differently, and is handled the same way.
//! - `io-patch`: the VMM overwrites each `0f a2` with `e6 f7` (`out 0xf7, al`), two bytes
//!   like CPUID, as a binary translator rewrites a sensitive instruction. Port I/O reaches
//!   userspace on every KVM (nested SVM included, where the other two traps do not), and
//!   KVM itself moves RIP past the `out` when the guest re-enters.
//!
//! Both patches are a trace the guest can find by reading its own code: Popek and
//! Goldberg's equivalence, broken (the `code-integrity` rule looks for it).

pub use super::answer::TrapDelivery;
use super::answer::{answer_cpuid, Answered, Answerer, ModeError};
use crate::arch::x86_64::cpuid::CpuidTable;
use crate::vm::exit::Exit;
use crate::vm::handler::ExitKind;
use crate::vm::vcpu::Vcpu;
use guest_payload::ports;
use guest_payload::timing::CPUID_OPCODE;
use kvm_bindings::{kvm_guest_debug, kvm_regs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

/// x86 has four debug address registers, DR0–DR3.
pub const DEBUG_ADDRESS_REGISTERS: usize = 4;
/// What replaces CPUID at a site patched for `int3-patch`: `int3; nop`, the same length.
pub const INT3_PATCH: [u8; 2] = [0xcc, 0x90];
/// What replaces CPUID at a site patched for `io-patch`: `out imm8, al` to the trap port.
pub const IO_PATCH: [u8; 2] = [0xe6, ports::CPUID_TRAP];
/// The vector of a debug-register breakpoint's exit (#DB).
pub const DEBUG_VECTOR: u32 = 1;
const BREAKPOINT_VECTOR: u32 = 3;
/// DR7 bit 10 reads as one.
const DR7_FIXED: u64 = 1 << 10;

/// The `--trap` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trap {
    /// Debug-register execution breakpoints on the CPUID sites; the code is untouched.
    #[default]
    HwBreakpoint,
    /// Patch each CPUID into `int3; nop` and handle the breakpoint exception.
    Int3Patch,
    /// Patch each CPUID into `out 0xf7, al` and emulate it on the port I/O exit: works on
    /// every KVM.
    IoPatch,
}

impl Trap {
    pub const fn name(self) -> &'static str {
        match self {
            Trap::HwBreakpoint => "hw-breakpoint",
            Trap::Int3Patch => "int3-patch",
            Trap::IoPatch => "io-patch",
        }
    }

    /// The bytes written over each CPUID, for the traps that patch code.
    pub const fn patch(self) -> Option<[u8; 2]> {
        match self {
            Trap::HwBreakpoint => None,
            Trap::Int3Patch => Some(INT3_PATCH),
            Trap::IoPatch => Some(IO_PATCH),
        }
    }

    /// How far past its site a trap's exit may report RIP: a #BP the address after the
    /// `int3`, a port I/O exit (from a KVM that completed the `out` first) the address
    /// after the `out`.
    pub const fn reported_past(self) -> u64 {
        match self {
            Trap::HwBreakpoint => 0,
            Trap::Int3Patch => 1,
            Trap::IoPatch => 2,
        }
    }
}

/// The one definition of trap geometry: the site of `sites` an exit at `rip` belongs to,
/// where exits report the site itself or the address `past` bytes after it. An exact
/// match wins (sites may be adjacent). Used by the traps, paravirt's hypercall site, the
/// trap probe and `trace`.
pub fn site_at(sites: &[u64], rip: u64, past: u64) -> Option<u64> {
    let exact = sites.iter().copied().find(|&site| site == rip);
    exact.or_else(|| sites.iter().copied().find(|&site| site.checked_add(past) == Some(rip)))
}

pub struct TrapEmulate {
    trap: Trap,
    /// Every CPUID the payload's code holds (decoded from the ELF).
    sites: Vec<u64>,
    /// The site of the guest's CPUID snapshot, counted apart from the timed ones.
    query_site: Option<u64>,
    cpuid: CpuidTable,
    /// Advance past the CPUID without answering it: the exit path's floor (benches).
    bare: bool,
    /// How the traps arrived (the first one decides).
    pub delivery: Option<TrapDelivery>,
    /// What KVM_SET_GUEST_DEBUG was given at arm, if anything.
    armed_debug: Option<kvm_guest_debug>,
}

impl TrapEmulate {
    pub fn new(trap: Trap, sites: Vec<u64>, query_site: Option<u64>, cpuid: CpuidTable) -> Self {
        Self {
            trap,
            sites,
            query_site,
            cpuid,
            bare: false,
            delivery: None,
            armed_debug: None,
        }
    }

    /// Traps armed as usual, but each trapped CPUID is only stepped over: no answer, no
    /// shaping. What is left is the bare round trip of the trap's exit.
    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }

    /// The site a trap at `rip` belongs to.
    fn site_of(&self, rip: u64) -> Option<u64> {
        site_at(&self.sites, rip, self.trap.reported_past())
    }

    fn kind_of(&self, site: u64) -> ExitKind {
        if Some(site) == self.query_site {
            ExitKind::CpuidQueryTrap
        } else {
            ExitKind::CpuidTrap
        }
    }

    /// Answers the CPUID trapped at `site` in one register write; `step_over` moves RIP
    /// past it (KVM does that itself for a port I/O exit).
    fn emulate(
        &mut self,
        vcpu: &mut dyn Vcpu,
        mut regs: kvm_regs,
        site: u64,
        step_over: bool,
        delivery: TrapDelivery,
    ) -> Result<Answered, ModeError> {
        self.delivery.get_or_insert(delivery);
        if !self.bare {
            answer_cpuid(&self.cpuid, &mut regs);
        }
        if step_over {
            regs.rip = site + CPUID_OPCODE.len() as u64;
        }
        if !self.bare || step_over {
            vcpu.set_regs(&regs)?;
        }
        Ok(Answered {
            kind: self.kind_of(site),
            shaped: !self.bare,
        })
    }

    /// A debug exit: a breakpoint (vector 1) or an int3 (vector 3) at one of our sites.
    fn on_debug(&mut self, vcpu: &mut dyn Vcpu, pc: u64, exception: u32) -> Result<Option<Answered>, ModeError> {
        let expected_vector = match self.trap {
            Trap::HwBreakpoint => DEBUG_VECTOR,
            Trap::Int3Patch => BREAKPOINT_VECTOR,
            Trap::IoPatch => return Ok(None),
        };
        match self.site_of(pc) {
            Some(site) if exception == expected_vector => {
                let regs = vcpu.regs()?;
                self.emulate(vcpu, regs, site, true, TrapDelivery::DebugExit).map(Some)
            }
            // Not a site: the guest's own single step. With KVM_GUESTDBG_USE_HW_BP a hardware
            // KVM hands every #DB to the VMM, the guest's own too (VMAware's #DB check sets
            // TF); it goes back as the guest would have taken it. A trap: RIP is already
            // past the instruction. DR6 is left as KVM left it (no payload). A guest INT3
            // under int3-patch is not given back: its RIP and length would need KVM's
            // soft-exception bookkeeping, and it stays an error naming the exit.
            None if exception == DEBUG_VECTOR && self.trap == Trap::HwBreakpoint => {
                vcpu.inject_exception(DEBUG_VECTOR as u8)?;
                Ok(Some(Answered {
                    kind: ExitKind::GuestException,
                    shaped: false,
                }))
            }
            _ => Ok(None),
        }
    }

    /// An `out` to the trap port: a patched CPUID.
    fn on_io_trap(&mut self, vcpu: &mut dyn Vcpu) -> Result<Option<Answered>, ModeError> {
        if self.trap != Trap::IoPatch {
            return Ok(None);
        }
        if self.bare {
            // Nothing to do at all: KVM completes the `out` on re-entry.
            self.delivery.get_or_insert(TrapDelivery::PortIo);
            return Ok(Some(Answered {
                kind: ExitKind::CpuidTrap,
                shaped: false,
            }));
        }
        let regs = vcpu.regs()?;
        match self.site_of(regs.rip) {
            Some(site) => self.emulate(vcpu, regs, site, false, TrapDelivery::PortIo).map(Some),
            None => Ok(None),
        }
    }

    /// KVM could not emulate the instruction at RIP: an emulating KVM's report of a patched
    /// `int3` (its emulator cannot run INT in long mode), the same trap delivered otherwise.
    fn on_emulation_failure(&mut self, vcpu: &mut dyn Vcpu) -> Result<Option<Answered>, ModeError> {
        if self.trap != Trap::Int3Patch {
            return Ok(None);
        }
        let regs = vcpu.regs()?;
        match self.site_of(regs.rip) {
            Some(site) => self
                .emulate(vcpu, regs, site, true, TrapDelivery::EmulationFailure)
                .map(Some),
            None => Ok(None),
        }
    }
}

/// Arms an execution breakpoint on `site` in debug address register `slot` (0-3).
pub fn set_breakpoint(debug: &mut kvm_guest_debug, slot: usize, site: u64) {
    debug.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    debug.arch.debugreg[7] |= DR7_FIXED;
    debug.arch.debugreg[slot] = site;
    // Global enable for this slot; R/W and LEN zero: break on execution.
    debug.arch.debugreg[7] |= 1 << (2 * slot + 1);
}

/// Is debug address register `slot` armed in `debug`?
pub fn breakpoint_set(debug: &kvm_guest_debug, slot: usize) -> bool {
    debug.control & KVM_GUESTDBG_USE_HW_BP != 0 && debug.arch.debugreg[7] & (1 << (2 * slot + 1)) != 0
}

/// Can `trap` trap this many CPUID sites? Checked before any VM exists, and again at arm.
pub fn check_sites(trap: Trap, sites: usize) -> Result<(), ModeError> {
    if sites == 0 {
        return Err(ModeError::NoCpuidSites);
    }
    if trap == Trap::HwBreakpoint && sites > DEBUG_ADDRESS_REGISTERS {
        return Err(ModeError::TooManySites {
            sites,
            slots: DEBUG_ADDRESS_REGISTERS,
        });
    }
    Ok(())
}

impl Answerer for TrapEmulate {
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ModeError> {
        check_sites(self.trap, self.sites.len())?;
        for &site in &self.sites {
            let mut found = [0u8; 2];
            vcpu.memory()
                .read_slice(&mut found, GuestAddress(site))
                .map_err(|source| ModeError::Memory { addr: site, source })?;
            if found != CPUID_OPCODE {
                return Err(ModeError::NotCpuid { addr: site, found });
            }
        }
        let mut debug = kvm_guest_debug::default();
        match self.trap {
            Trap::HwBreakpoint => {
                for (slot, &site) in self.sites.iter().enumerate() {
                    set_breakpoint(&mut debug, slot, site);
                }
                vcpu.set_guest_debug(&debug)?;
                self.armed_debug = Some(debug);
            }
            Trap::Int3Patch | Trap::IoPatch => {
                let patch = self.trap.patch().unwrap_or(CPUID_OPCODE);
                for &site in &self.sites {
                    vcpu.memory()
                        .write_slice(&patch, GuestAddress(site))
                        .map_err(|source| ModeError::Memory { addr: site, source })?;
                }
                if self.trap == Trap::Int3Patch {
                    debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
                    vcpu.set_guest_debug(&debug)?;
                    self.armed_debug = Some(debug);
                }
            }
        }
        Ok(())
    }

    fn answer(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit) -> Result<Option<Answered>, ModeError> {
        const IO_TRAP_PORT: u16 = ports::CPUID_TRAP as u16;
        match *exit {
            Exit::Debug { pc, exception } => self.on_debug(vcpu, pc, exception),
            Exit::IoOut { port: IO_TRAP_PORT, .. } => self.on_io_trap(vcpu),
            Exit::InternalError {
                suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
            } => self.on_emulation_failure(vcpu),
            _ => Ok(None),
        }
    }

    fn delivery(&self) -> Option<TrapDelivery> {
        self.delivery
    }

    fn guest_debug(&self) -> Option<kvm_guest_debug> {
        self.armed_debug
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::ExitPath;
    use crate::shaping::Policies;
    use crate::vm::handler::{ExitHandler, Flow};
    use crate::vm::vcpu::sim::SimVcpu;
    use kvm_bindings::kvm_cpuid_entry2;

    const PROBE_SITE: u64 = 0x10_0100;
    const QUERY_SITE: u64 = 0x10_0200;

    fn table() -> CpuidTable {
        CpuidTable::new(vec![kvm_cpuid_entry2 {
            function: 0,
            eax: 0xd,
            ebx: 0x6874_7541,
            ecx: 0x444d_4163,
            edx: 0x6974_6e65,
            ..Default::default()
        }])
    }

    /// A simulated vCPU whose code holds CPUID at both sites, stopped at `rip` with a
    /// CPUID(0) request in its registers.
    fn vcpu_at(rip: u64) -> SimVcpu {
        let mut vcpu = SimVcpu::new();
        for site in [PROBE_SITE, QUERY_SITE] {
            vcpu.memory.write_slice(&CPUID_OPCODE, GuestAddress(site)).unwrap();
        }
        vcpu.regs.rip = rip;
        vcpu.regs.rax = 0xffff_ffff_0000_0000;
        vcpu.regs.rcx = 0;
        vcpu
    }

    fn armed(trap: Trap, vcpu: &mut SimVcpu) -> TrapEmulate {
        let mut handler = TrapEmulate::new(trap, vec![PROBE_SITE, QUERY_SITE], Some(QUERY_SITE), table());
        handler.arm(vcpu).unwrap();
        handler
    }

    fn dispatch(handler: &mut TrapEmulate, vcpu: &mut SimVcpu, exit: Exit) -> Result<Flow, ModeError> {
        ExitPath {
            answerer: handler,
            policy: &mut Policies::none(),
            tsc_trap: None,
            console: None,
        }
        .handle(vcpu, &exit, 0)
    }

    fn answered_leaf0(vcpu: &SimVcpu) -> bool {
        (vcpu.regs.rax, vcpu.regs.rbx, vcpu.regs.rcx, vcpu.regs.rdx) == (0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65)
    }

    #[test]
    fn a_hardware_breakpoint_is_answered_and_stepped_over_in_one_register_write() {
        let mut vcpu = vcpu_at(PROBE_SITE);
        let mut handler = armed(Trap::HwBreakpoint, &mut vcpu);
        let debug = vcpu.debug.expect("breakpoints armed");
        assert_eq!(debug.arch.debugreg[0], PROBE_SITE);
        assert_eq!(debug.arch.debugreg[1], QUERY_SITE);
        assert_eq!(debug.arch.debugreg[7] & 0b1010, 0b1010, "slots 0 and 1 enabled");
        let exit = Exit::Debug {
            pc: PROBE_SITE,
            exception: 1,
        };
        assert_eq!(
            dispatch(&mut handler, &mut vcpu, exit).unwrap(),
            Flow::Continue(ExitKind::CpuidTrap)
        );
        assert!(answered_leaf0(&vcpu), "upper halves cleared, registers from the table");
        assert_eq!(vcpu.regs.rip, PROBE_SITE + 2);
        assert_eq!(
            (vcpu.regs_reads.get(), vcpu.regs_writes),
            (1, 1),
            "one read, one write per exit"
        );
        assert_eq!(handler.delivery, Some(TrapDelivery::DebugExit));
    }

    #[test]
    fn the_guests_own_single_step_goes_back_to_it_and_nothing_else_does() {
        let mut vcpu = vcpu_at(QUERY_SITE);
        let mut handler = armed(Trap::HwBreakpoint, &mut vcpu);
        // A #DB away from every site: the guest's TF. Given back, RIP and registers alone.
        let before = vcpu.regs;
        let own_step = Exit::Debug {
            pc: PROBE_SITE + 0x40,
            exception: 1,
        };
        assert_eq!(
            dispatch(&mut handler, &mut vcpu, own_step).unwrap(),
            Flow::Continue(ExitKind::GuestException)
        );
        assert_eq!(vcpu.injected, [1]);
        assert_eq!(vcpu.regs, before, "nothing emulated");
        // A #BP away from every site is not ours to give back: it stays an error.
        let breakpoint = Exit::Debug {
            pc: PROBE_SITE + 0x40,
            exception: 3,
        };
        assert!(dispatch(&mut handler, &mut vcpu, breakpoint).is_err());
        // Under int3-patch a stray #DB is not given back either.
        let mut vcpu = vcpu_at(QUERY_SITE);
        let mut handler = armed(Trap::Int3Patch, &mut vcpu);
        let step = Exit::Debug {
            pc: PROBE_SITE + 0x40,
            exception: 1,
        };
        assert!(dispatch(&mut handler, &mut vcpu, step).is_err());
        assert!(vcpu.injected.is_empty());
    }

    #[test]
    fn io_patch_rewrites_each_cpuid_into_an_out_and_leaves_rip_to_kvm() {
        let mut vcpu = vcpu_at(QUERY_SITE);
        let mut handler = armed(Trap::IoPatch, &mut vcpu);
        for site in [PROBE_SITE, QUERY_SITE] {
            let mut code = [0u8; 2];
            vcpu.memory.read_slice(&mut code, GuestAddress(site)).unwrap();
            assert_eq!(code, [0xe6, 0xf7], "out 0xf7, al");
        }
        assert!(vcpu.debug.is_none(), "no debug traps for io-patch");
        let exit = Exit::IoOut {
            port: u16::from(ports::CPUID_TRAP),
            value: 0,
        };
        assert_eq!(
            dispatch(&mut handler, &mut vcpu, exit.clone()).unwrap(),
            Flow::Continue(ExitKind::CpuidQueryTrap)
        );
        assert!(answered_leaf0(&vcpu));
        assert_eq!(vcpu.regs.rip, QUERY_SITE, "KVM steps over the out on re-entry");
        assert_eq!(handler.delivery, Some(TrapDelivery::PortIo));
        // A KVM that completed the out before exiting reports the RIP after it.
        vcpu.regs.rip = PROBE_SITE + 2;
        assert_eq!(
            dispatch(&mut handler, &mut vcpu, exit.clone()).unwrap(),
            Flow::Continue(ExitKind::CpuidTrap)
        );
        // An out to the trap port from anywhere else is no CPUID of ours.
        vcpu.regs.rip = 0x10_0300;
        assert!(matches!(
            dispatch(&mut handler, &mut vcpu, exit),
            Err(ModeError::UnexpectedIoTrap { rip: 0x10_0300, .. })
        ));
    }

    #[test]
    fn int3_patch_takes_breakpoints_and_an_emulating_kvms_failures_at_its_sites() {
        let mut vcpu = vcpu_at(PROBE_SITE);
        let mut handler = armed(Trap::Int3Patch, &mut vcpu);
        let mut code = [0u8; 2];
        vcpu.memory.read_slice(&mut code, GuestAddress(PROBE_SITE)).unwrap();
        assert_eq!(code, INT3_PATCH);
        let breakpoint = Exit::Debug {
            pc: PROBE_SITE + 1,
            exception: 3,
        };
        assert_eq!(
            dispatch(&mut handler, &mut vcpu, breakpoint).unwrap(),
            Flow::Continue(ExitKind::CpuidTrap)
        );
        assert_eq!(vcpu.regs.rip, PROBE_SITE + 2);

        let failure = Exit::InternalError {
            suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
        };
        vcpu.regs.rip = QUERY_SITE;
        assert_eq!(
            dispatch(&mut handler, &mut vcpu, failure.clone()).unwrap(),
            Flow::Continue(ExitKind::CpuidQueryTrap)
        );
        // An emulation failure elsewhere is the guest's own problem, reported as fatal.
        vcpu.regs.rip = 0x10_0300;
        assert_eq!(dispatch(&mut handler, &mut vcpu, failure).unwrap(), Flow::Fatal);
    }

    #[test]
    fn a_trap_of_the_wrong_kind_is_refused() {
        // (A #DB of the right kind in the wrong place is the guest's own: given back, in
        // the_guests_own_single_step_goes_back_to_it_and_nothing_else_does.)
        let mut vcpu = vcpu_at(PROBE_SITE);
        let mut handler = armed(Trap::HwBreakpoint, &mut vcpu);
        let wrong_vector = Exit::Debug {
            pc: PROBE_SITE,
            exception: 3,
        };
        assert!(dispatch(&mut handler, &mut vcpu, wrong_vector).is_err());
        assert!(vcpu.injected.is_empty());
    }

    #[test]
    fn sites_that_do_not_hold_cpuid_or_too_many_for_dr0_dr3_are_refused_before_the_run() {
        let mut vcpu = vcpu_at(PROBE_SITE);
        vcpu.memory
            .write_slice(&[0x90, 0x90], GuestAddress(QUERY_SITE))
            .unwrap();
        let mut handler = TrapEmulate::new(Trap::IoPatch, vec![PROBE_SITE, QUERY_SITE], Some(QUERY_SITE), table());
        assert!(matches!(
            handler.arm(&mut vcpu),
            Err(ModeError::NotCpuid { addr: QUERY_SITE, .. })
        ));

        let mut vcpu = SimVcpu::new();
        let sites: Vec<u64> = (0..5).map(|i| 0x10_0000 + 16 * i).collect();
        for &site in &sites {
            vcpu.memory.write_slice(&CPUID_OPCODE, GuestAddress(site)).unwrap();
        }
        let mut handler = TrapEmulate::new(Trap::HwBreakpoint, sites.clone(), None, table());
        assert!(matches!(
            handler.arm(&mut vcpu),
            Err(ModeError::TooManySites { sites: 5, slots: 4 })
        ));
        let mut patched = TrapEmulate::new(Trap::IoPatch, sites, None, table());
        assert!(patched.arm(&mut vcpu).is_ok(), "patching traps any number of sites");
        let mut nothing = TrapEmulate::new(Trap::IoPatch, vec![], None, table());
        assert!(matches!(nothing.arm(&mut vcpu), Err(ModeError::NoCpuidSites)));
    }

    #[test]
    fn a_bare_trap_steps_over_without_answering() {
        let mut vcpu = vcpu_at(PROBE_SITE);
        let mut handler = TrapEmulate::new(Trap::HwBreakpoint, vec![PROBE_SITE], None, table()).bare();
        handler.arm(&mut vcpu).unwrap();
        let exit = Exit::Debug {
            pc: PROBE_SITE,
            exception: 1,
        };
        dispatch(&mut handler, &mut vcpu, exit).unwrap();
        assert_eq!(vcpu.regs.rip, PROBE_SITE + 2);
        assert_eq!(vcpu.regs.rax, 0xffff_ffff_0000_0000, "not answered");
    }
}
