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
//! touching guest code): a guest that reads its own code sees the patches.

use super::answer::ModeError;
use crate::shaping::evader::{MsrAnswer, Trap, TrappedMsr, Traps};
use crate::shaping::{ExitPolicy, TscRead};
use crate::vm::exit::Exit;
use crate::vm::handler::ExitKind;
use crate::vm::loader::TscSites;
use crate::vm::vcpu::Vcpu;
use guest_payload::ports;
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
    /// RDTSC and RDTSCP sites patched.
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
    /// An armed trap's sites are patched now.
    patched: bool,
    /// Guest TSC minus host TSC as armed: what the guest's own RDTSC would read.
    offset: i64,
    /// The guest's TSC as the vCPU was armed: APERF and MPERF count from there.
    start: u64,
    record: TscTrapRecord,
}

impl TscTrap {
    /// `traps`: which reads the evader traps; the sites of the others are left alone.
    pub fn new(mut sites: TscSites, traps: Traps) -> Self {
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
            rdtsc_sites: sites.rdtsc.len(),
            rdtscp_sites: sites.rdtscp.len(),
            ..Default::default()
        };
        Self {
            sites,
            traps,
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
    /// found; the armed ones are checked now and patched later) and reads the guest's TSC
    /// offset, before the vCPU first runs.
    pub fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ModeError> {
        if self.sites.rdtsc.is_empty() && self.sites.rdtscp.is_empty() && self.traps.any_instruction() {
            return Err(ModeError::NoTscSites);
        }
        self.offset = vcpu.tsc_offset()?;
        self.start = vcpu.now().wrapping_add(self.offset as u64);
        self.patch(vcpu, Trap::Every, true)?;
        self.patch(vcpu, Trap::Armed, false)
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
        if self.patched {
            self.record.disarmed_unread += u64::from(!read);
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
                    rewrite(vcpu, sites, name, patched, original)?;
                }
            }
            self.patched = false;
        }
        if cpuid {
            self.patch(vcpu, Trap::Armed, true)?;
            self.patched = true;
            self.record.armed += 1;
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
        let (port, sites) = match *exit {
            Exit::IoOut { port, .. } if port == u16::from(ports::RDTSC_TRAP) => (ports::RDTSC_TRAP, &self.sites.rdtsc),
            Exit::IoOut { port, .. } if port == u16::from(ports::RDTSCP_TRAP) => {
                (ports::RDTSCP_TRAP, &self.sites.rdtscp)
            }
            _ => return Ok(None),
        };
        let mut regs = vcpu.regs()?;
        // KVM reports RIP at the `out` (SVM) or past it (VMX, software KVMs).
        let at = |rip: u64| sites.binary_search(&rip).is_ok();
        if !at(regs.rip) && !at(regs.rip.wrapping_sub(OUT_BYTES)) {
            return Err(ModeError::UnexpectedTscTrap { port, rip: regs.rip });
        }
        let truth = exit_tsc.wrapping_add(self.offset as u64);
        let instruction = if port == ports::RDTSCP_TRAP {
            TscRead::Rdtscp
        } else {
            TscRead::Rdtsc
        };
        let told = policy.tsc_read(vcpu, truth, instruction)?;
        regs.rax = told & 0xffff_ffff;
        regs.rdx = told >> 32;
        if port == ports::RDTSCP_TRAP {
            // TSC_AUX as KVM leaves it for a vCPU nobody configured.
            regs.rcx = 0;
        }
        vcpu.set_regs(&regs)?;
        self.told(truth, told);
        self.record
            .clocks
            .instruction(port == ports::RDTSCP_TRAP)
            .told(truth, told);
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
        vcpu.memory()
            .write_slice(with, GuestAddress(addr))
            .map_err(|source| ModeError::Memory { addr, source })?;
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
        let mut trap = TscTrap::new(sites, every());
        trap.arm(vcpu).unwrap();
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
        let mut trap = TscTrap::new(sites, armed);
        trap.arm(&mut vcpu).unwrap();
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
        let mut trap = TscTrap::new(sites, rdtsc_only);
        assert!(matches!(trap.arm(&mut vcpu), Err(ModeError::NoTscSites)));
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
        for (index, name) in [(0xe7, "aperf"), (0xe8, "mperf")] {
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
        );
        assert!(matches!(
            wrong.arm(&mut vcpu),
            Err(ModeError::NotTscRead { addr: SITE, .. })
        ));
        assert!(matches!(
            TscTrap::new(TscSites::default(), every()).arm(&mut vcpu),
            Err(ModeError::NoTscSites)
        ));
    }
}
