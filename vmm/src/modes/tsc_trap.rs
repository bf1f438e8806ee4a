//! Trapping the guest's TSC reads, for the evasions that answer RDTSC with a clock of
//! their own (BetterTiming and its kin trap RDTSC in the kernel; KVM offers no RDTSC exit
//! to userspace). Each RDTSC (`0f 31`) is patched into `out imm8, al` to the RDTSC trap
//! port, two bytes like RDTSC, and each RDTSCP (`0f 01 f9`) into the same `out` to its own
//! port and a NOP; on the port I/O exit the VMM answers EDX:EAX (and ECX, TSC_AUX, for
//! RDTSCP) with what the run's exit policy makes of the guest's TSC at that moment. KVM
//! moves RIP past the `out` itself, as for `--trap io-patch`.
//!
//! Only the instructions the evader traps are patched; one trapped "armed" (Ophion's
//! design) is patched only after a CPUID exit, and restored after the next exit, the read
//! or any other.
//!
//! Patching is this testbed's mechanism, not the evader's (a kernel evader traps without
//! touching guest code): a guest that reads its own code sees the patches. Where the
//! payload has few enough sites, `--tsc-trap hw-breakpoint` traps them with execution
//! breakpoints in DR0-DR3 instead (beside the CPUID trap's, under `--trap hw-breakpoint`):
//! the code stays untouched, and an armed trap is a breakpoint set after a CPUID exit and
//! cleared after the next exit, one KVM_SET_GUEST_DEBUG each.

use super::answer::ModeError;
use super::trap_emulate::{breakpoint_set, set_breakpoint, DEBUG_ADDRESS_REGISTERS, DEBUG_VECTOR};
use crate::shaping::evader::{MsrAnswer, Trap, TrappedMsr, Traps};
use crate::shaping::{ExitPolicy, TscRead};
use crate::vm::exit::Exit;
use crate::vm::handler::ExitKind;
use crate::vm::loader::TscSites;
use crate::vm::vcpu::Vcpu;
use guest_payload::ports;
use kvm_bindings::kvm_guest_debug;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

const RDTSC_OPCODE: [u8; 2] = [0x0f, 0x31];
const RDTSCP_OPCODE: [u8; 3] = [0x0f, 0x01, 0xf9];
/// What replaces each RDTSC: `out imm8, al` to the RDTSC trap port.
pub const RDTSC_PATCH: [u8; 2] = [0xe6, ports::RDTSC_TRAP];
/// What replaces each RDTSCP: the same `out` to its own port, and a NOP.
pub const RDTSCP_PATCH: [u8; 3] = [0xe6, ports::RDTSCP_TRAP, 0x90];
/// Bytes of the `out` a patched site exits after (KVM reports RIP past it).
const OUT_BYTES: u64 = 2;
/// The MSR that reads the TSC; an evasion that intercepts it has its reads filtered to
/// this VMM (`GuestVm::trap_msr_reads`).
pub const IA32_TSC: u32 = 0x10;

/// How the guest's RDTSCs and RDTSCPs reach the VMM (`--tsc-trap`): the testbed's
/// mechanism; the evader's clock is the same either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TscTrapBy {
    /// Each site patched into an `out` to the VMM's port: any number of sites, on every
    /// KVM; a guest that reads its own code sees the patch.
    #[default]
    IoPatch,
    /// An execution breakpoint per site in DR0-DR3 (shared with `--trap hw-breakpoint`'s
    /// CPUID sites): at most four sites, the code untouched; needs a KVM that delivers
    /// debug exits.
    HwBreakpoint,
}

impl TscTrapBy {
    pub const fn name(self) -> &'static str {
        match self {
            TscTrapBy::IoPatch => "io-patch",
            TscTrapBy::HwBreakpoint => "hw-breakpoint",
        }
    }
}

/// Can breakpoints trap the sites `traps` traps, in the debug address registers `taken`
/// leaves free (`cpuid_slots`: how many the CPUID trap took)? Checked before any VM
/// exists, and again at arm.
pub fn check_breakpoint_sites(sites: &TscSites, traps: &Traps, cpuid_slots: usize) -> Result<(), ModeError> {
    let trapped = usize::from(traps.rdtsc != Trap::None) * sites.rdtsc.len()
        + usize::from(traps.rdtscp != Trap::None) * sites.rdtscp.len();
    let free = DEBUG_ADDRESS_REGISTERS.saturating_sub(cpuid_slots);
    if trapped > free {
        return Err(ModeError::TooManyTscSites {
            sites: trapped,
            free,
            cpuid: if cpuid_slots > 0 {
                format!(", after the CPUID trap's {cpuid_slots} (--trap hw-breakpoint)")
            } else {
                String::new()
            },
        });
    }
    Ok(())
}

/// One clock the guest can read, as the trapped reads of it were told.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClockRecord {
    pub reads: u64,
    /// Answers less than the answer before, on this clock.
    pub backwards: u64,
    /// The furthest an answer was behind the truth, and ahead of it, in cycles.
    pub max_behind: u64,
    pub max_ahead: u64,
    /// The last answer's distance from the truth (negative: behind).
    pub last_moved: i64,
    #[serde(skip)]
    last: Option<u64>,
}

impl ClockRecord {
    fn told(&mut self, truth: u64, told: u64) {
        let moved = told.wrapping_sub(truth) as i64;
        self.reads += 1;
        self.backwards += u64::from(self.last.is_some_and(|last| told < last));
        self.max_behind = self.max_behind.max(moved.min(0).unsigned_abs());
        self.max_ahead = self.max_ahead.max(moved.max(0).unsigned_abs());
        self.last_moved = moved;
        self.last = Some(told);
    }
}

/// What the trapped reads were told, against what the guest's own TSC would have read:
/// the report's "how far the clock was moved from the truth".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TscTrapRecord {
    /// How they were trapped: patched (`io-patch`), or breakpoints on untouched code.
    pub by: TscTrapBy,
    /// RDTSC and RDTSCP sites trapped.
    pub rdtsc_sites: usize,
    pub rdtscp_sites: usize,
    /// The TSC's reads (RDTSC, RDTSCP and MSR 0x10 together) on one timeline: how many,
    /// how far behind and ahead of the truth, how many went backwards.
    #[serde(flatten)]
    pub tsc: ClockRecord,
    /// Of which reads of IA32_TSC (MSR 0x10), where the evasion intercepts them.
    pub msr_reads: u64,
    /// Times an armed trap was set after a CPUID exit, and of those, how many were
    /// disarmed by another exit before the guest read the TSC.
    pub armed: u64,
    pub disarmed_unread: u64,
    /// Each clock the guest read through a trap (`rdtsc`, `rdtscp`, `msr-tsc`, `aperf`,
    /// `mperf`, `tsc-aux`), on its own: APERF and MPERF count from the vCPU's start.
    pub clocks: Clocks,
}

/// The clock the record at `at` is of: RDTSC, RDTSCP, then the MSRs in
/// `TrappedMsr::ALL` order (named there).
fn clock_name(at: usize) -> &'static str {
    match at {
        0 => "rdtsc",
        1 => "rdtscp",
        n => TrappedMsr::ALL.get(n - 2).map_or("?", |msr| msr.name()),
    }
}

/// One record per clock, kept in an array (a trapped read's handler is on the guest's
/// time) and reported as a map of those read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clocks([ClockRecord; 2 + TrappedMsr::ALL.len()]);

impl Clocks {
    /// RDTSC's record, or RDTSCP's.
    fn instruction(&mut self, rdtscp: bool) -> &mut ClockRecord {
        &mut self.0[usize::from(rdtscp)]
    }

    /// A trapped MSR's record (after the two instructions, in `TrappedMsr::ALL` order).
    fn msr(&mut self, msr: TrappedMsr) -> &mut ClockRecord {
        let at = TrappedMsr::ALL.iter().position(|m| *m == msr).unwrap_or_default();
        &mut self.0[2 + at]
    }

    /// The clocks read, by name.
    pub fn read(&self) -> impl Iterator<Item = (&'static str, &ClockRecord)> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, c)| c.reads > 0)
            .map(|(at, c)| (clock_name(at), c))
    }

    pub fn get(&self, name: &str) -> Option<&ClockRecord> {
        self.read().find(|(n, _)| *n == name).map(|(_, c)| c)
    }
}

impl Serialize for Clocks {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (name, clock) in self.read() {
            map.serialize_entry(name, clock)?;
        }
        map.end()
    }
}

/// The RDTSC/RDTSCP trap of one vCPU.
pub struct TscTrap {
    sites: TscSites,
    traps: Traps,
    by: TscTrapBy,
    /// What the CPUID trap armed in DR0-DR3, kept beside the RDTSC trap's breakpoints.
    cpuid_debug: kvm_guest_debug,
    /// An armed trap's sites are patched (or their breakpoints set) now.
    patched: bool,
    /// Guest TSC minus host TSC as armed: what the guest's own RDTSC would read.
    offset: i64,
    /// The guest's TSC as the vCPU was armed: APERF and MPERF count from there.
    start: u64,
    record: TscTrapRecord,
}

impl TscTrap {
    /// `traps`: which reads the evader traps; the sites of the others are left alone.
    pub fn new(mut sites: TscSites, traps: Traps, by: TscTrapBy) -> Self {
        // Sorted: a trapped read finds its site by binary search.
        sites.rdtsc.sort_unstable();
        sites.rdtscp.sort_unstable();
        if traps.rdtsc == Trap::None {
            sites.rdtsc.clear();
        }
        if traps.rdtscp == Trap::None {
            sites.rdtscp.clear();
        }
        let record = TscTrapRecord {
            by,
            rdtsc_sites: sites.rdtsc.len(),
            rdtscp_sites: sites.rdtscp.len(),
            ..Default::default()
        };
        Self {
            sites,
            traps,
            by,
            cpuid_debug: kvm_guest_debug::default(),
            patched: false,
            start: 0,
            offset: 0,
            record,
        }
    }

    pub fn record(&self) -> &TscTrapRecord {
        &self.record
    }

    /// Patches every site trapped on every read (each checked to hold what the decoder
    /// found; the armed ones are checked now and patched later), or sets their
    /// breakpoints beside `cpuid_debug` (what the CPUID trap armed), and reads the guest's
    /// TSC offset, before the vCPU first runs.
    pub fn arm(&mut self, vcpu: &mut dyn Vcpu, cpuid_debug: Option<kvm_guest_debug>) -> Result<(), ModeError> {
        if self.sites.rdtsc.is_empty() && self.sites.rdtscp.is_empty() && self.traps.any_instruction() {
            return Err(ModeError::NoTscSites);
        }
        self.offset = vcpu.tsc_offset()?;
        self.start = vcpu.now().wrapping_add(self.offset as u64);
        match self.by {
            TscTrapBy::IoPatch => {
                self.patch(vcpu, Trap::Every, true)?;
                self.patch(vcpu, Trap::Armed, false)
            }
            TscTrapBy::HwBreakpoint => {
                self.cpuid_debug = cpuid_debug.unwrap_or_default();
                let taken = (0..DEBUG_ADDRESS_REGISTERS)
                    .filter(|&slot| breakpoint_set(&self.cpuid_debug, slot))
                    .count();
                check_breakpoint_sites(&self.sites, &self.traps, taken)?;
                // Checked, not patched: the code stays as it is.
                self.patch(vcpu, Trap::Every, false)?;
                self.patch(vcpu, Trap::Armed, false)?;
                if self.traps.rdtsc == Trap::Every || self.traps.rdtscp == Trap::Every {
                    vcpu.set_guest_debug(&self.breakpoints(false))?;
                }
                Ok(())
            }
        }
    }

    /// The CPUID trap's debug state with a breakpoint on each site trapped on every read,
    /// and (`armed`) on each trapped armed, in the registers it left free.
    fn breakpoints(&self, armed: bool) -> kvm_guest_debug {
        let mut debug = self.cpuid_debug;
        let mut free = (0..DEBUG_ADDRESS_REGISTERS).filter(|&slot| !breakpoint_set(&self.cpuid_debug, slot));
        for (how, sites) in [
            (self.traps.rdtsc, &self.sites.rdtsc),
            (self.traps.rdtscp, &self.sites.rdtscp),
        ] {
            if how == Trap::Every || (armed && how == Trap::Armed) {
                // check_breakpoint_sites counted them against the free registers.
                for &site in sites {
                    if let Some(slot) = free.next() {
                        set_breakpoint(&mut debug, slot, site);
                    }
                }
            }
        }
        debug
    }

    /// Patches (or, `patch` false, checks) the sites trapped `how`.
    fn patch(&mut self, vcpu: &mut dyn Vcpu, how: Trap, patch: bool) -> Result<(), ModeError> {
        let (rdtsc, rdtscp) = if patch {
            (&RDTSC_PATCH[..], &RDTSCP_PATCH[..])
        } else {
            (&RDTSC_OPCODE[..], &RDTSCP_OPCODE[..])
        };
        if self.traps.rdtsc == how {
            rewrite(vcpu, &self.sites.rdtsc, "rdtsc", &RDTSC_OPCODE, rdtsc)?;
        }
        if self.traps.rdtscp == how {
            rewrite(vcpu, &self.sites.rdtscp, "rdtscp", &RDTSCP_OPCODE, rdtscp)?;
        }
        Ok(())
    }

    /// An armed trap after each exit: a CPUID exit (`cpuid`) arms it for the next read;
    /// any exit after that, the read's own included, disarms it first.
    pub fn exit_handled(&mut self, vcpu: &mut dyn Vcpu, cpuid: bool, read: bool) -> Result<(), ModeError> {
        if !self.traps.armed() {
            return Ok(());
        }
        let was = self.patched;
        if was {
            self.record.disarmed_unread += u64::from(!read);
        }
        if cpuid {
            self.record.armed += 1;
        }
        if was != cpuid {
            match self.by {
                TscTrapBy::IoPatch => self.rewrite_armed(vcpu, cpuid)?,
                TscTrapBy::HwBreakpoint => vcpu.set_guest_debug(&self.breakpoints(cpuid))?,
            }
        }
        self.patched = cpuid;
        Ok(())
    }

    /// Patches (`patch`) or restores the sites trapped armed.
    fn rewrite_armed(&mut self, vcpu: &mut dyn Vcpu, patch: bool) -> Result<(), ModeError> {
        for (how, sites, name, original, patched) in [
            (
                self.traps.rdtsc,
                &self.sites.rdtsc,
                "rdtsc",
                &RDTSC_OPCODE[..],
                &RDTSC_PATCH[..],
            ),
            (
                self.traps.rdtscp,
                &self.sites.rdtscp,
                "rdtscp",
                &RDTSCP_OPCODE[..],
                &RDTSCP_PATCH[..],
            ),
        ] {
            if how == Trap::Armed {
                let (from, to) = if patch {
                    (original, patched)
                } else {
                    (patched, original)
                };
                rewrite(vcpu, sites, name, from, to)?;
            }
        }
        Ok(())
    }

    /// A trapped read, answered through `policy`; `None` if `exit` is not one.
    pub fn answer(
        &mut self,
        vcpu: &mut dyn Vcpu,
        exit: &Exit,
        exit_tsc: u64,
        policy: &mut dyn ExitPolicy,
    ) -> Result<Option<ExitKind>, ModeError> {
        if let Exit::RdMsr { index } = *exit {
            let Some((msr, answer)) = TrappedMsr::at(index).and_then(|m| self.traps.msr.get(&m).map(|a| (m, *a)))
            else {
                return Ok(None);
            };
            let tsc = exit_tsc.wrapping_add(self.offset as u64);
            let clock = |policy: &mut dyn ExitPolicy, vcpu: &mut dyn Vcpu| match answer {
                MsrAnswer::Clock => policy.tsc_read(vcpu, tsc, TscRead::Msr),
                MsrAnswer::Host => Ok(tsc),
            };
            let (truth, told) = match msr {
                TrappedMsr::Tsc => (tsc, clock(policy, vcpu)?),
                TrappedMsr::Aperf | TrappedMsr::Mperf => (
                    tsc.wrapping_sub(self.start),
                    clock(policy, vcpu)?.wrapping_sub(self.start),
                ),
                TrappedMsr::TscAux => (0, 0),
            };
            vcpu.reply_msr(told)?;
            if msr == TrappedMsr::Tsc {
                self.record.msr_reads += 1;
                self.told(truth, told);
            }
            self.record.clocks.msr(msr).told(truth, told);
            return Ok(Some(ExitKind::MsrTrap));
        }
        let (rdtscp, step) = match *exit {
            Exit::IoOut { port, .. } if port == u16::from(ports::RDTSC_TRAP) && self.by == TscTrapBy::IoPatch => {
                (false, None)
            }
            Exit::IoOut { port, .. } if port == u16::from(ports::RDTSCP_TRAP) && self.by == TscTrapBy::IoPatch => {
                (true, None)
            }
            Exit::Debug {
                pc,
                exception: DEBUG_VECTOR,
            } if self.by == TscTrapBy::HwBreakpoint => {
                // A breakpoint fires before the instruction: the VMM steps over it.
                if self.sites.rdtsc.binary_search(&pc).is_ok() {
                    (false, Some(pc + RDTSC_OPCODE.len() as u64))
                } else if self.sites.rdtscp.binary_search(&pc).is_ok() {
                    (true, Some(pc + RDTSCP_OPCODE.len() as u64))
                } else {
                    // Another's breakpoint (the CPUID trap's).
                    return Ok(None);
                }
            }
            _ => return Ok(None),
        };
        let mut regs = vcpu.regs()?;
        match step {
            Some(next) => regs.rip = next,
            None => {
                // KVM reports RIP at the `out` (SVM) or past it (VMX, software KVMs).
                let sites = if rdtscp { &self.sites.rdtscp } else { &self.sites.rdtsc };
                let at = |rip: u64| sites.binary_search(&rip).is_ok();
                if !at(regs.rip) && !at(regs.rip.wrapping_sub(OUT_BYTES)) {
                    let port = if rdtscp { ports::RDTSCP_TRAP } else { ports::RDTSC_TRAP };
                    return Err(ModeError::UnexpectedTscTrap { port, rip: regs.rip });
                }
            }
        }
        let truth = exit_tsc.wrapping_add(self.offset as u64);
        let instruction = if rdtscp { TscRead::Rdtscp } else { TscRead::Rdtsc };
        let told = policy.tsc_read(vcpu, truth, instruction)?;
        regs.rax = told & 0xffff_ffff;
        regs.rdx = told >> 32;
        if rdtscp {
            // TSC_AUX as KVM leaves it for a vCPU nobody configured.
            regs.rcx = 0;
        }
        vcpu.set_regs(&regs)?;
        self.told(truth, told);
        self.record.clocks.instruction(rdtscp).told(truth, told);
        Ok(Some(ExitKind::TscTrap))
    }

    /// One read of the TSC answered with `told` where the truth was `truth`.
    fn told(&mut self, truth: u64, told: u64) {
        self.record.tsc.told(truth, told);
    }
}

/// Writes `with` over each site, checked to hold `expected` (a site that does not is
/// refused, named: the decoder and the guest's code disagree).
fn rewrite(
    vcpu: &mut dyn Vcpu,
    sites: &[u64],
    name: &'static str,
    expected: &[u8],
    with: &[u8],
) -> Result<(), ModeError> {
    for &addr in sites {
        let mut found = vec![0u8; expected.len()];
        vcpu.memory()
            .read_slice(&mut found, GuestAddress(addr))
            .map_err(|source| ModeError::Memory { addr, source })?;
        if found != expected {
            return Err(ModeError::NotTscRead {
                instruction: name,
                addr,
                found,
            });
        }
        // Checked and left as it is (breakpoints, or an armed site not yet armed).
        if with != expected {
            vcpu.memory()
                .write_slice(with, GuestAddress(addr))
                .map_err(|source| ModeError::Memory { addr, source })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::Policies;
    use crate::vm::vcpu::sim::SimVcpu;

    const SITE: u64 = 0x10_0200;

    fn armed(vcpu: &mut SimVcpu, rdtscp: bool) -> TscTrap {
        let (code, sites): (&[u8], _) = if rdtscp {
            (
                &RDTSCP_OPCODE,
                TscSites {
                    rdtsc: vec![],
                    rdtscp: vec![SITE],
                },
            )
        } else {
            (
                &RDTSC_OPCODE,
                TscSites {
                    rdtsc: vec![SITE],
                    rdtscp: vec![],
                },
            )
        };
        vcpu.memory.write_slice(code, GuestAddress(SITE)).unwrap();
        let mut trap = TscTrap::new(sites, every(), TscTrapBy::IoPatch);
        trap.arm(vcpu, None).unwrap();
        trap
    }

    fn every() -> Traps {
        Traps {
            rdtsc: Trap::Every,
            rdtscp: Trap::Every,
            msr: TrappedMsr::ALL.into_iter().map(|m| (m, MsrAnswer::Clock)).collect(),
        }
    }

    fn code(vcpu: &SimVcpu) -> [u8; 2] {
        let mut code = [0u8; 2];
        vcpu.memory.read_slice(&mut code, GuestAddress(SITE)).unwrap();
        code
    }

    #[test]
    fn an_armed_trap_is_patched_after_a_cpuid_and_undone_after_the_next_exit() {
        let mut vcpu = SimVcpu::new();
        vcpu.memory.write_slice(&RDTSC_OPCODE, GuestAddress(SITE)).unwrap();
        let sites = TscSites {
            rdtsc: vec![SITE],
            rdtscp: vec![],
        };
        let armed = Traps {
            rdtsc: Trap::Armed,
            ..Traps::default()
        };
        let mut trap = TscTrap::new(sites, armed, TscTrapBy::IoPatch);
        trap.arm(&mut vcpu, None).unwrap();
        assert_eq!(code(&vcpu), RDTSC_OPCODE, "not patched before a CPUID");
        trap.exit_handled(&mut vcpu, true, false).unwrap();
        assert_eq!(code(&vcpu), RDTSC_PATCH);
        trap.exit_handled(&mut vcpu, false, true).unwrap();
        assert_eq!(code(&vcpu), RDTSC_OPCODE, "the read disarms it");
        trap.exit_handled(&mut vcpu, true, false).unwrap();
        trap.exit_handled(&mut vcpu, false, false).unwrap();
        assert_eq!(code(&vcpu), RDTSC_OPCODE, "so does any other exit");
        trap.exit_handled(&mut vcpu, true, false).unwrap();
        trap.exit_handled(&mut vcpu, true, false).unwrap();
        assert_eq!(code(&vcpu), RDTSC_PATCH, "a second CPUID re-arms it");
        assert_eq!((trap.record().armed, trap.record().disarmed_unread), (4, 2));
    }

    #[test]
    fn an_untrapped_instruction_is_left_alone() {
        let mut vcpu = SimVcpu::new();
        vcpu.memory.write_slice(&RDTSCP_OPCODE, GuestAddress(SITE)).unwrap();
        let sites = TscSites {
            rdtsc: vec![],
            rdtscp: vec![SITE],
        };
        let rdtsc_only = Traps {
            rdtsc: Trap::Every,
            ..Traps::default()
        };
        let mut trap = TscTrap::new(sites, rdtsc_only, TscTrapBy::IoPatch);
        assert!(matches!(trap.arm(&mut vcpu, None), Err(ModeError::NoTscSites)));
        assert_eq!(code(&vcpu), [0x0f, 0x01]);
        assert_eq!(trap.record().rdtscp_sites, 0);
    }

    #[test]
    fn a_patched_rdtsc_is_answered_with_the_guests_tsc_split_into_edx_eax() {
        let mut vcpu = SimVcpu::new();
        vcpu.tsc_offset = 1 << 36;
        let mut trap = armed(&mut vcpu, false);
        let mut code = [0u8; 2];
        vcpu.memory.read_slice(&mut code, GuestAddress(SITE)).unwrap();
        assert_eq!(code, RDTSC_PATCH);
        vcpu.regs.rip = SITE + 2;
        let exit = Exit::IoOut {
            port: u16::from(ports::RDTSC_TRAP),
            value: 0,
        };
        let exit_tsc = 0x1234_5678_9abc;
        let answered = trap.answer(&mut vcpu, &exit, exit_tsc, &mut Policies::none()).unwrap();
        assert_eq!(answered, Some(ExitKind::TscTrap));
        let truth = exit_tsc + (1 << 36);
        assert_eq!((vcpu.regs.rdx << 32) | vcpu.regs.rax, truth);
        assert_eq!(trap.record().tsc.reads, 1);
        assert_eq!(trap.record().tsc.last_moved, 0);
        // SVM's KVM reports RIP at the `out`, not past it: the same site.
        vcpu.regs.rip = SITE;
        let again = trap.answer(&mut vcpu, &exit, exit_tsc, &mut Policies::none()).unwrap();
        assert_eq!(again, Some(ExitKind::TscTrap));
        let console = Exit::IoOut {
            port: ports::CONSOLE,
            value: 0,
        };
        assert_eq!(
            trap.answer(&mut vcpu, &console, 0, &mut Policies::none()).unwrap(),
            None
        );
    }

    #[test]
    fn a_filtered_read_of_msr_0x10_is_answered_from_the_same_clock() {
        let mut vcpu = SimVcpu::new();
        vcpu.tsc_offset = 5;
        let mut trap = armed(&mut vcpu, false);
        let read = Exit::RdMsr { index: IA32_TSC };
        let kind = trap.answer(&mut vcpu, &read, 1_000, &mut Policies::none()).unwrap();
        assert_eq!(kind, Some(ExitKind::MsrTrap));
        assert_eq!(vcpu.msr_reply, Some(1_005));
        assert_eq!((trap.record().tsc.reads, trap.record().msr_reads), (1, 1));
        let other = Exit::RdMsr { index: 0xe9 };
        assert_eq!(trap.answer(&mut vcpu, &other, 0, &mut Policies::none()).unwrap(), None);
        assert_eq!(trap.record().clocks.get("msr-tsc").unwrap().reads, 1);
    }

    #[test]
    fn aperf_and_mperf_count_from_the_vcpus_start_and_tsc_aux_is_zero() {
        let mut vcpu = SimVcpu::new();
        vcpu.advance(50_000);
        let mut trap = armed(&mut vcpu, false);
        let start = vcpu.host_tsc.get();
        for (index, name) in [(0xe8, "aperf"), (0xe7, "mperf")] {
            let read = Exit::RdMsr { index };
            trap.answer(&mut vcpu, &read, start + 9_000, &mut Policies::none())
                .unwrap();
            assert_eq!(vcpu.msr_reply, Some(9_000), "{name}");
            assert_eq!(trap.record().clocks.get(name).unwrap().last_moved, 0);
        }
        trap.answer(
            &mut vcpu,
            &Exit::RdMsr { index: 0xc000_0103 },
            start,
            &mut Policies::none(),
        )
        .unwrap();
        assert_eq!(vcpu.msr_reply, Some(0));
        assert_eq!(trap.record().msr_reads, 0, "not reads of the TSC");
    }

    #[test]
    fn rdtscp_gets_its_own_port_a_nop_and_ecx() {
        let mut vcpu = SimVcpu::new();
        let mut trap = armed(&mut vcpu, true);
        let mut code = [0u8; 3];
        vcpu.memory.read_slice(&mut code, GuestAddress(SITE)).unwrap();
        assert_eq!(code, RDTSCP_PATCH);
        vcpu.regs.rip = SITE + 2;
        vcpu.regs.rcx = 77;
        let exit = Exit::IoOut {
            port: u16::from(ports::RDTSCP_TRAP),
            value: 0,
        };
        trap.answer(&mut vcpu, &exit, 1 << 40, &mut Policies::none()).unwrap();
        assert_eq!(vcpu.regs.rcx, 0);
        assert_eq!((vcpu.regs.rdx << 32) | vcpu.regs.rax, 1 << 40);
    }

    #[test]
    fn a_trap_from_an_unpatched_place_or_a_site_that_is_no_rdtsc_is_refused() {
        let mut vcpu = SimVcpu::new();
        let mut trap = armed(&mut vcpu, false);
        vcpu.regs.rip = 0x10_0900;
        let exit = Exit::IoOut {
            port: u16::from(ports::RDTSC_TRAP),
            value: 0,
        };
        assert!(matches!(
            trap.answer(&mut vcpu, &exit, 0, &mut Policies::none()),
            Err(ModeError::UnexpectedTscTrap { rip: 0x10_0900, .. })
        ));
        let mut vcpu = SimVcpu::new();
        let mut wrong = TscTrap::new(
            TscSites {
                rdtsc: vec![SITE],
                rdtscp: vec![],
            },
            every(),
            TscTrapBy::IoPatch,
        );
        assert!(matches!(
            wrong.arm(&mut vcpu, None),
            Err(ModeError::NotTscRead { addr: SITE, .. })
        ));
        assert!(matches!(
            TscTrap::new(TscSites::default(), every(), TscTrapBy::IoPatch).arm(&mut vcpu, None),
            Err(ModeError::NoTscSites)
        ));
    }

    /// Two RDTSCs and an RDTSCP at `SITE`, `SITE + 0x10` and `SITE + 0x20`, trapped by
    /// breakpoints `how`, beside a CPUID trap's breakpoint in DR0.
    fn by_breakpoints(vcpu: &mut SimVcpu, how: Trap) -> (TscTrap, Result<(), ModeError>) {
        vcpu.memory.write_slice(&RDTSC_OPCODE, GuestAddress(SITE)).unwrap();
        vcpu.memory
            .write_slice(&RDTSC_OPCODE, GuestAddress(SITE + 0x10))
            .unwrap();
        vcpu.memory
            .write_slice(&RDTSCP_OPCODE, GuestAddress(SITE + 0x20))
            .unwrap();
        let sites = TscSites {
            rdtsc: vec![SITE + 0x10, SITE],
            rdtscp: vec![SITE + 0x20],
        };
        let traps = Traps {
            rdtsc: how,
            rdtscp: how,
            ..Traps::default()
        };
        let mut cpuid = kvm_guest_debug::default();
        set_breakpoint(&mut cpuid, 0, CPUID_SITE);
        let mut trap = TscTrap::new(sites, traps, TscTrapBy::HwBreakpoint);
        let armed = trap.arm(vcpu, Some(cpuid));
        (trap, armed)
    }

    const CPUID_SITE: u64 = 0x10_0100;

    /// The addresses in DR0-DR3 that DR7 enables.
    fn breakpoints(vcpu: &SimVcpu) -> Vec<u64> {
        let debug = vcpu.debug.expect("guest debug set");
        (0..DEBUG_ADDRESS_REGISTERS)
            .filter(|&slot| breakpoint_set(&debug, slot))
            .map(|slot| debug.arch.debugreg[slot])
            .collect()
    }

    #[test]
    fn breakpoints_trap_in_the_registers_the_cpuid_trap_left_and_the_code_stays_untouched() {
        let mut vcpu = SimVcpu::new();
        vcpu.tsc_offset = 7;
        let (mut trap, armed) = by_breakpoints(&mut vcpu, Trap::Every);
        armed.unwrap();
        assert_eq!(breakpoints(&vcpu), [CPUID_SITE, SITE, SITE + 0x10, SITE + 0x20]);
        assert_eq!(code(&vcpu), RDTSC_OPCODE, "nothing patched");
        assert_eq!(trap.record().by, TscTrapBy::HwBreakpoint);

        // A breakpoint fires before the instruction: answered, and stepped over.
        let at = |pc| Exit::Debug {
            pc,
            exception: DEBUG_VECTOR,
        };
        let kind = trap.answer(&mut vcpu, &at(SITE + 0x10), 1_000, &mut Policies::none());
        assert_eq!(kind.unwrap(), Some(ExitKind::TscTrap));
        assert_eq!(
            (vcpu.regs.rip, (vcpu.regs.rdx << 32) | vcpu.regs.rax),
            (SITE + 0x12, 1_007)
        );
        vcpu.regs.rcx = 77;
        trap.answer(&mut vcpu, &at(SITE + 0x20), 2_000, &mut Policies::none())
            .unwrap();
        assert_eq!((vcpu.regs.rip, vcpu.regs.rcx), (SITE + 0x23, 0), "RDTSCP: 3 bytes, ECX");
        assert_eq!(trap.record().clocks.get("rdtscp").unwrap().reads, 1);
        // The CPUID trap's breakpoint is the CPUID trap's to answer; a patched site's
        // port is no trap of this one's.
        assert_eq!(
            trap.answer(&mut vcpu, &at(CPUID_SITE), 0, &mut Policies::none())
                .unwrap(),
            None
        );
        let port = Exit::IoOut {
            port: u16::from(ports::RDTSC_TRAP),
            value: 0,
        };
        assert_eq!(trap.answer(&mut vcpu, &port, 0, &mut Policies::none()).unwrap(), None);
    }

    #[test]
    fn breakpoints_are_refused_past_the_free_debug_registers_naming_the_counts() {
        let mut vcpu = SimVcpu::new();
        vcpu.memory
            .write_slice(&RDTSC_OPCODE, GuestAddress(SITE + 0x30))
            .unwrap();
        let (_, armed) = by_breakpoints(&mut vcpu, Trap::Every);
        armed.unwrap();
        let four = TscSites {
            rdtsc: vec![1, 2, 3, 4],
            rdtscp: vec![5],
        };
        let rdtsc_only = Traps {
            rdtsc: Trap::Every,
            ..Traps::default()
        };
        check_breakpoint_sites(&four, &rdtsc_only, 0).unwrap();
        let error = check_breakpoint_sites(&four, &rdtsc_only, 1).unwrap_err();
        assert!(matches!(error, ModeError::TooManyTscSites { sites: 4, free: 3, .. }));
        assert!(error.to_string().contains("after the CPUID trap's 1"), "{error}");
        assert!(error.to_string().contains("--tsc-trap io-patch"), "{error}");
        assert!(
            check_breakpoint_sites(&four, &every(), 0).is_err(),
            "RDTSCP's site counts too"
        );
    }

    #[test]
    fn an_armed_breakpoint_is_set_after_a_cpuid_and_cleared_after_the_next_exit() {
        let mut vcpu = SimVcpu::new();
        let (mut trap, armed) = by_breakpoints(&mut vcpu, Trap::Armed);
        armed.unwrap();
        assert!(
            vcpu.debug.is_none(),
            "nothing set before a CPUID: the CPUID trap's own stands"
        );
        trap.exit_handled(&mut vcpu, true, false).unwrap();
        assert_eq!(breakpoints(&vcpu), [CPUID_SITE, SITE, SITE + 0x10, SITE + 0x20]);
        trap.exit_handled(&mut vcpu, false, true).unwrap();
        assert_eq!(breakpoints(&vcpu), [CPUID_SITE], "the read disarms it");
        trap.exit_handled(&mut vcpu, true, false).unwrap();
        trap.exit_handled(&mut vcpu, false, false).unwrap();
        assert_eq!(breakpoints(&vcpu), [CPUID_SITE], "so does any other exit");
        assert_eq!(code(&vcpu), RDTSC_OPCODE, "never patched");
        assert_eq!((trap.record().armed, trap.record().disarmed_unread), (2, 1));
    }
}
