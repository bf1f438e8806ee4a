//! `hide-exits`: the clock BetterTiming's README describes ("save the time it took for the
//! vcpu to exit"), done as a VMM can: RDTSC and RDTSCP are trapped, and the guest's clock
//! stops for exactly the time of each CPUID and TSC-read exit, and runs on in between.
//! (The original's code hides more: see `bettertiming.rs`.)
//!
//! A kernel evader starts its stopwatch in the exit handler; this VMM's starts when
//! KVM_RUN returns, so KVM's own exit and entry path (the world switch: a few hundred
//! cycles on hardware, thousands here) would show. It is hidden too, by the shortest guest
//! stretch seen between one exit and the next, learnt as the run goes and taken off as the
//! next exit begins, once the stretch after the exit is known: never more than that
//! stretch, so the clock never runs backwards, and never revised, so it never jumps
//! forward. Reads of MSR 0x10 are filtered to the VMM and
//! answered from the same clock, as BetterTiming's are.

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;

/// One vCPU's clock that stops during tagged exits.
#[derive(Debug, Default)]
pub struct HideExits {
    /// Everything taken off the clock so far.
    hidden: u64,
    /// The shortest guest stretch seen, one exit's end to the next KVM_RUN return: KVM's
    /// round trip at most.
    round_trip: Option<u64>,
    /// The last exit was tagged: its share of KVM's round trip is taken off as the next
    /// exit begins, once the stretch between them is known (so it never exceeds it).
    owed: bool,
    /// When the last exit ended.
    last_end: Option<u64>,
    /// The exit under way: when KVM_RUN returned, and whether it is tagged.
    exit_tsc: u64,
    tagging: bool,
}

impl ExitPolicy for HideExits {
    fn exit_began(&mut self, _vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        if let Some(end) = self.last_end {
            let stretch = exit_tsc.saturating_sub(end);
            let round_trip = self.round_trip.map_or(stretch, |r| r.min(stretch));
            self.round_trip = Some(round_trip);
            if std::mem::take(&mut self.owed) {
                self.hidden = self.hidden.saturating_add(round_trip);
            }
        }
        self.exit_tsc = exit_tsc;
        self.tagging = false;
        Ok(())
    }

    fn cpuid_answered(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        self.tagging = true;
        Ok(())
    }

    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, _instruction: TscRead) -> Result<u64, ShapingError> {
        self.tagging = true;
        Ok(read.saturating_sub(self.hidden))
    }

    fn exit_ended(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        let now = vcpu.now();
        if self.tagging {
            self.hidden = self.hidden.saturating_add(now.saturating_sub(self.exit_tsc));
            self.owed = true;
        }
        self.last_end = Some(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    /// A trapped read after `guest` cycles in the guest and `kernel` of KVM's round trip;
    /// the VMM then spends `handler` cycles. Returns what the guest was told.
    fn read(vcpu: &mut SimVcpu, clock: &mut HideExits, kernel: u64, guest: u64, handler: u64) -> u64 {
        vcpu.advance(kernel + guest);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(vcpu, exit_tsc).unwrap();
        let told = clock.tsc_read(vcpu, exit_tsc, TscRead::Rdtsc).unwrap();
        vcpu.advance(handler);
        clock.exit_ended(vcpu).unwrap();
        told
    }

    #[test]
    fn tagged_exits_vanish_from_the_clock_and_it_never_runs_backwards() {
        let mut vcpu = SimVcpu::new();
        let mut clock = HideExits::default();
        let first = read(&mut vcpu, &mut clock, 9_000, 0, 3_000);
        let mut last = first;
        // Back-to-back reads: KVM's round trip of 9,000 and 10 guest cycles each; the VMM's
        // work varies.
        for handler in [2_000, 40_000, 2_500, 700] {
            let told = read(&mut vcpu, &mut clock, 9_000, 10, handler);
            assert!(told >= last, "backwards");
            assert!(told - last <= 10, "{} cycles between two reads", told - last);
            last = told;
        }
        // A CPUID exit between two reads is tagged: it costs the guest nothing either.
        vcpu.advance(9_000 + 5);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, exit_tsc).unwrap();
        clock.cpuid_answered(&mut vcpu, exit_tsc).unwrap();
        vcpu.advance(25_000);
        clock.exit_ended(&mut vcpu).unwrap();
        let after = read(&mut vcpu, &mut clock, 9_000, 5, 1_000);
        assert!(after - last <= 10, "the CPUID cost the guest {}", after - last);
        // The host's TSC ran on: the guest's fell behind by everything hidden.
        assert!(vcpu.host_tsc.get() - after > 100_000);
    }

    #[test]
    fn a_slower_round_trip_shows_and_a_faster_one_never_moves_the_clock_back() {
        let mut vcpu = SimVcpu::new();
        let mut clock = HideExits::default();
        let a = read(&mut vcpu, &mut clock, 9_000, 0, 1_000);
        let b = read(&mut vcpu, &mut clock, 9_000, 0, 1_000);
        let c = read(&mut vcpu, &mut clock, 12_000, 0, 1_000);
        assert_eq!(c - b, 3_000, "what exceeds the shortest round trip shows");
        let d = read(&mut vcpu, &mut clock, 4_000, 0, 1_000);
        assert_eq!(a, b, "the first round trip is the shortest yet: all of it hidden");
        assert_eq!(d, c, "a shorter one is hidden whole, never past the read before");
        let e = read(&mut vcpu, &mut clock, 9_000, 0, 1_000);
        assert_eq!(e - d, 5_000, "a shorter round trip found later changes no earlier read");
    }
}
