//! `bettertiming`: SamuelTulach/BetterTiming's clock as its code reads, at
//! 3d95a8fe8a9e6f072c7732e83c6cca43023aa4a7 (`timing.patch`, an AMD SVM patch for
//! Linux 5.9.2). RDTSC is intercepted (L8) and marked as a "tagged" exit, like CPUID
//! (L34), WBINVD (L16), XSETBV (L25), INVD (L42) and reads of MSR 0x10 (L105). A wrapper
//! round `vcpu_enter_guest` (L122-L138) takes `last_exit_start = rdtsc()` *before* entering
//! the guest and, where the exit was tagged, adds everything since — entry, the guest's
//! own run, the exit, its handler — to a per-vCPU `total_exit_time`. RDTSC answers
//! `rdtsc() - (total_exit_time + rdtsc() - last_exit_start)` (L57-L60), that is the host
//! TSC as the guest was last entered, less the total. Nothing ever resynchronises it.
//!
//! The consequence, which its README's description ("the time it took for the vcpu to
//! exit") does not say: the guest's own time before a tagged exit vanishes too, so a guest
//! whose every exit is tagged reads the same TSC again and again; the clock moves only by
//! the length of the untagged round trips between (here: console output). `hide-exits` is
//! the clock the README describes.
//!
//! Here the tagged exits are those this VMM sees of the list: CPUIDs it answers, the
//! trapped RDTSCs and reads of MSR 0x10 (filtered to the VMM, answered with the same value
//! as RDTSC, as L99-L105 do; refused where KVM offers no userspace MSR exits); the guest's
//! entry is when KVM_RUN is called. Not reproduced: WBINVD, XSETBV and INVD (KVM handles
//! them in the kernel). RDTSCP is not intercepted by the original, and its evader file
//! (`configs/evaders/bettertiming.json`) leaves it untrapped.
//!
//! Hypervisor-Phantom's AMD "NIKA" patch (Scrut1ny/Hypervisor-Phantom 5757bb7,
//! `Hypervisor-Phantom/patches/Kernel/amd616.mypatch`) keeps this arithmetic for RDTSC
//! and MSR 0x10 and answers RDTSCP from a clock of its own (L158-L183,
//! `rdtscp_interception`): function statics `rdtsc_last`, `rdtsc_prev`, `rdtsc_read`
//! (the host TSC at the last three RDTSCPs) and `data` (the last answer), all starting at
//! zero. Each RDTSCP sets `data` to BetterTiming's clock where `rdtsc_last != 0` and the
//! gap since the last read is longer than the gap before it, and otherwise adds a tenth
//! of the distance (`data += (clock - data) / 10`, u64). [`ClosingByTenths`] is that, in
//! the guest's TSC domain (the gaps are the same; the first answers, a tenth of the clock,
//! are smaller than the host's would be). SVM's KVM intercepts RDTSCP only where the
//! guest's CPUID hides it (`svm_recalc_instruction_intercepts`), as Hypervisor-Phantom's
//! own libvirt example does (`<feature policy="disable" name="rdtscp"/>`, "Use if using
//! patched kernel"): its zoo file hides it too.

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;

/// One vCPU's `total_exit_time` and `last_exit_start`, and where RDTSCP reads NIKA's
/// clock, that clock.
#[derive(Debug, Default)]
pub struct BetterTiming {
    rdtscp: Option<ClosingByTenths>,
    total_exit_time: u64,
    /// When the guest was last entered (the end of the exit before): the original's
    /// `last_exit_start`. `None` before the first exit.
    last_exit_start: Option<u64>,
    /// When KVM_RUN returned for the exit under way.
    exit_tsc: u64,
    tagged: bool,
}

impl BetterTiming {
    /// `rdtscp_by_tenths`: RDTSCP reads NIKA's clock, not RDTSC's.
    pub fn new(rdtscp_by_tenths: bool) -> Self {
        Self {
            rdtscp: rdtscp_by_tenths.then(ClosingByTenths::default),
            ..Self::default()
        }
    }
}

/// NIKA's RDTSCP clock: its four statics, zero until set.
#[derive(Debug, Default)]
pub struct ClosingByTenths {
    last: u64,
    prev: u64,
    read: u64,
    data: u64,
}

impl ClosingByTenths {
    /// One RDTSCP at `truth` (the original's `rdtsc()`), where BetterTiming's clock reads
    /// `clock`. The original's u64 arithmetic, wrapping where it would.
    pub fn answer(&mut self, truth: u64, clock: u64) -> u64 {
        self.last = self.prev;
        self.prev = self.read;
        self.read = truth;
        let diff_last = self.prev.wrapping_sub(self.last);
        let diff_prev = self.read.wrapping_sub(self.prev);
        let data_diff = clock.wrapping_sub(self.data);
        if self.last != 0 && diff_last < diff_prev {
            self.data = clock;
        } else {
            self.data = self.data.wrapping_add(data_diff / 10);
        }
        self.data
    }
}

impl ExitPolicy for BetterTiming {
    fn exit_began(&mut self, _vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        self.exit_tsc = exit_tsc;
        self.tagged = false;
        Ok(())
    }

    fn cpuid_answered(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        self.tagged = true;
        Ok(())
    }

    /// `read` is the guest's TSC as KVM_RUN returned; the original answers as of the
    /// last entry, less the total.
    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, instruction: TscRead) -> Result<u64, ShapingError> {
        self.tagged = true;
        let since_entry = self
            .last_exit_start
            .map_or(0, |entry| self.exit_tsc.saturating_sub(entry));
        let clock = read.saturating_sub(since_entry).saturating_sub(self.total_exit_time);
        Ok(match (&mut self.rdtscp, instruction) {
            (Some(tenths), TscRead::Rdtscp) => tenths.answer(read, clock),
            _ => clock,
        })
    }

    fn exit_ended(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        let now = vcpu.now();
        if self.tagged {
            if let Some(entry) = self.last_exit_start {
                self.total_exit_time = self.total_exit_time.saturating_add(now.saturating_sub(entry));
            }
        }
        self.last_exit_start = Some(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    /// One round trip: the guest runs `guest` cycles and exits; the VMM spends `handler`.
    /// A read returns what the guest was told; any other exit is untagged.
    fn round_trip(vcpu: &mut SimVcpu, clock: &mut BetterTiming, guest: u64, handler: u64, read: bool) -> Option<u64> {
        vcpu.advance(guest);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(vcpu, exit_tsc).unwrap();
        let told = read.then(|| clock.tsc_read(vcpu, exit_tsc, TscRead::Rdtsc).unwrap());
        vcpu.advance(handler);
        clock.exit_ended(vcpu).unwrap();
        told
    }

    #[test]
    fn the_guests_own_time_before_a_tagged_exit_vanishes_with_it() {
        let mut vcpu = SimVcpu::new();
        let mut clock = BetterTiming::default();
        round_trip(&mut vcpu, &mut clock, 1_000, 500, false);
        let first = round_trip(&mut vcpu, &mut clock, 10, 3_000, true).unwrap();
        // A million cycles of guest work between two reads: the original hides them all.
        let second = round_trip(&mut vcpu, &mut clock, 1_000_000, 3_000, true).unwrap();
        assert_eq!(second, first, "tagged round trips leave the clock where it was");
        // An untagged round trip (console output) is time the clock shows, whole.
        round_trip(&mut vcpu, &mut clock, 7_000, 2_000, false);
        let third = round_trip(&mut vcpu, &mut clock, 10, 3_000, true).unwrap();
        assert_eq!(third - second, 9_000);
        // MSR 0x10 is tagged and answered alike.
        vcpu.advance(50_000);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, exit_tsc).unwrap();
        assert_eq!(clock.tsc_read(&mut vcpu, exit_tsc, TscRead::Msr).unwrap(), third);
        clock.exit_ended(&mut vcpu).unwrap();
    }

    #[test]
    fn a_tagged_cpuid_round_trip_is_hidden_like_a_read() {
        let mut vcpu = SimVcpu::new();
        let mut clock = BetterTiming::default();
        round_trip(&mut vcpu, &mut clock, 100, 100, false);
        let before = round_trip(&mut vcpu, &mut clock, 10, 3_000, true).unwrap();
        vcpu.advance(20_000);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, exit_tsc).unwrap();
        clock.cpuid_answered(&mut vcpu, exit_tsc).unwrap();
        vcpu.advance(30_000);
        clock.exit_ended(&mut vcpu).unwrap();
        let after = round_trip(&mut vcpu, &mut clock, 10, 3_000, true).unwrap();
        assert_eq!(after, before);
    }

    /// NIKA's RDTSCP, by its arithmetic: a tenth of the way to the clock, then all of it
    /// once a gap between reads is longer than the one before (and two reads came first).
    #[test]
    fn nikas_rdtscp_closes_a_tenth_of_the_distance_unless_the_gap_grew() {
        let mut nika = ClosingByTenths::default();
        assert_eq!(nika.answer(1_000, 1_000_000), 100_000, "a tenth of the clock first");
        assert_eq!(nika.answer(2_000, 1_000_000), 190_000, "the gap grew, but last is 0");
        // Gaps 1,000 then 1,000: not longer, a tenth.
        assert_eq!(nika.answer(3_000, 1_190_000), 290_000);
        // Gaps 1,000 then 5,000: longer, the clock itself.
        assert_eq!(nika.answer(8_000, 2_000_000), 2_000_000);
        // Gaps 5,000 then 10: a tenth again (of nothing left, here).
        assert_eq!(nika.answer(8_010, 2_000_000), 2_000_000);
        assert_eq!(nika.answer(8_020, 2_000_100), 2_000_010);
    }

    #[test]
    fn rdtscp_reads_nikas_clock_and_rdtsc_bettertimings() {
        let mut vcpu = SimVcpu::new();
        let mut clock = BetterTiming::new(true);
        round_trip(&mut vcpu, &mut clock, 1_000, 500, false);
        vcpu.advance(5_000);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, exit_tsc).unwrap();
        let rdtsc = clock.tsc_read(&mut vcpu, exit_tsc, TscRead::Rdtsc).unwrap();
        let rdtscp = clock.tsc_read(&mut vcpu, exit_tsc, TscRead::Rdtscp).unwrap();
        assert_eq!(rdtscp, rdtsc / 10, "{rdtsc} {rdtscp}");
        let mut plain = BetterTiming::new(false);
        plain.exit_began(&mut vcpu, exit_tsc).unwrap();
        let same = plain.tsc_read(&mut vcpu, exit_tsc, TscRead::Rdtscp).unwrap();
        assert_eq!(same, plain.tsc_read(&mut vcpu, exit_tsc, TscRead::Rdtsc).unwrap());
    }
}
