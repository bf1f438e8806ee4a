//! The evaders that move the TSC offset instead of trapping RDTSC, each either through
//! the offset itself (`"via": "offset"`, as the original; a KVM that ignores offset
//! writes, like this machine's, refuses it) or, so it can be studied where offsets do not
//! move, as the same clock answered through the RDTSC trap (`"via": "trap"`: the trap's
//! own exits, which the original does not have, then show, and are not counted as
//! entries).
//!
//! `offset-bleed`: h33p/kvm-rdtsc-hack at 3cb91ea8c124f78f6b63286b9879c9cbaf234fd9,
//! `main.c`. A CPUID with EAX 0 (L101-L108) makes the next entry set the offset to
//! `l1_tsc_offset - (constant_tsc_offset + the exit's duration)` (L78-L85; the constant
//! is 1000, L16) and adds that to a running `temp_offset`; every other entry gives back
//! at most `constant / 2` of it, setting the offset to `l1_tsc_offset + shift` (L87-L93).
//! Since `l1_tsc_offset` is never updated (L72, L95-L96), the offset is not cumulative:
//! after a CPUID(0) the clock is behind by its exit plus the constant — so a read just
//! before the CPUID can be later than one just after (the clock runs backwards, and the
//! report says how often) — and after any other entry it is *ahead* by what is given back.
//!
//! `offset-resync`: jonomango/hv at 0f4508caf254975d1124e98087d7c160711dc451,
//! `hv/timing.cpp`. An exit whose handler sets `hide_vm_exit_overhead` (CPUID among them,
//! `hv/exit-handlers.cpp` L21) lowers the offset by `vm_exit_tsc_overhead` (L61) and arms
//! the preemption timer to exit 10,000 guest TSC ticks later (L56-L58); any other exit,
//! that timer's included, or an overhead above 10,000, sets the offset back to zero
//! (L46-L54). The overhead is the least of ten `vmcall` round trips less a bare
//! `rdtsc; rdtsc` (L65-L105).
//!
//! Here: an exit's duration is from KVM_RUN's return to the next KVM_RUN (KVM's own path
//! is not in it); the entries are those of the exits this VMM sees (a kernel evader sees
//! every exit KVM handles too); the CPUIDs count only where they reach the VMM; hv's
//! "measured" overhead is the shortest CPUID exit seen so far, the VMM's part of it; its
//! timer is checked at the next exit or trapped read rather than firing on its own.

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::tsc::TscMethod;
use crate::vm::vcpu::Vcpu;
use serde::Deserialize;

/// How the clock reaches the guest.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// The vCPU's TSC offset, moved at each entry, as the original does.
    Offset,
    /// Trapped RDTSCs answered with the truth plus the same adjustment.
    Trap,
}

/// hv's ceiling on an overhead worth hiding (`timing.cpp` L46).
const RESYNC_CEILING: u64 = 10_000;

#[derive(Debug)]
enum Rule {
    Bleed {
        constant: u64,
        owed: i64,
    },
    Resync {
        overhead: Option<u64>,
        learnt: Option<u64>,
        ticks: u64,
        /// When (host TSC) the timer armed at the last hiding entry fires.
        timer: Option<u64>,
    },
}

/// One vCPU's offset clock.
#[derive(Debug)]
pub struct OffsetClock {
    rule: Rule,
    via: Via,
    /// The guest's clock minus the truth, as set at the last entry.
    adjust: i64,
    /// The exit under way: when KVM_RUN returned, its leaf (EAX as it began), whether it
    /// was a CPUID, whether a trapped read.
    exit_tsc: u64,
    leaf: u64,
    cpuid: bool,
    read: bool,
    tsc_method: Option<TscMethod>,
}

impl OffsetClock {
    fn new(rule: Rule, via: Via) -> Self {
        Self {
            rule,
            via,
            adjust: 0,
            exit_tsc: 0,
            leaf: u64::MAX,
            cpuid: false,
            read: false,
            tsc_method: None,
        }
    }

    /// kvm-rdtsc-hack's clock, `constant` its `constant_tsc_offset`.
    pub fn bleed(constant: u64, via: Via) -> Self {
        Self::new(Rule::Bleed { constant, owed: 0 }, via)
    }

    /// hv's clock: `overhead` given, or learnt as the shortest CPUID exit; put back to the
    /// truth `ticks` after a hiding entry.
    pub fn resync(overhead: Option<u64>, ticks: u64, via: Via) -> Self {
        Self::new(
            Rule::Resync {
                overhead,
                learnt: None,
                ticks,
                timer: None,
            },
            via,
        )
    }

    /// hv's preemption timer, had it fired by `now`: the offset back to zero.
    fn timer_fired(&mut self, now: u64) {
        if let Rule::Resync { timer, .. } = &mut self.rule {
            if timer.is_some_and(|at| now >= at) {
                *timer = None;
                self.adjust = 0;
            }
        }
    }

    /// The adjustment the next entry sets.
    fn entry(&mut self, now: u64) -> i64 {
        let duration = now.saturating_sub(self.exit_tsc);
        match &mut self.rule {
            Rule::Bleed { constant, owed } => {
                let constant = i64::try_from(*constant).unwrap_or(i64::MAX);
                if self.cpuid && self.leaf == 0 {
                    let off = -(constant.saturating_add(i64::try_from(duration).unwrap_or(i64::MAX)));
                    *owed = owed.saturating_add(off);
                    off
                } else {
                    let shift = (*owed).max(-constant / 2);
                    *owed -= shift;
                    -shift
                }
            }
            Rule::Resync {
                overhead,
                learnt,
                ticks,
                timer,
            } => {
                if self.cpuid {
                    *learnt = Some(learnt.map_or(duration, |l| l.min(duration)));
                }
                let hide = overhead.or(*learnt).unwrap_or(0);
                if self.cpuid && hide <= RESYNC_CEILING {
                    *timer = Some(now.saturating_add(*ticks));
                    self.adjust.saturating_sub(i64::try_from(hide).unwrap_or(i64::MAX))
                } else {
                    *timer = None;
                    0
                }
            }
        }
    }
}

impl ExitPolicy for OffsetClock {
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        if self.via == Via::Offset {
            self.tsc_method = Some(vcpu.enable_tsc_moves()?);
        }
        Ok(())
    }

    fn exit_began(&mut self, vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        self.exit_tsc = exit_tsc;
        self.leaf = vcpu.regs()?.rax & 0xffff_ffff;
        self.cpuid = false;
        self.read = false;
        if self.via == Via::Offset {
            let before = self.adjust;
            self.timer_fired(exit_tsc);
            if self.adjust != before {
                vcpu.move_tsc(self.adjust - before)?;
            }
        }
        Ok(())
    }

    fn cpuid_answered(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        self.cpuid = true;
        Ok(())
    }

    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, instruction: TscRead) -> Result<u64, ShapingError> {
        self.read = true;
        if self.via == Via::Offset || instruction == TscRead::Msr {
            return Ok(read);
        }
        self.timer_fired(self.exit_tsc);
        Ok(read.saturating_add_signed(self.adjust))
    }

    /// The next entry: a trapped read is none in the original (it does not trap RDTSC).
    fn exit_ended(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        if self.read && self.via == Via::Trap {
            return Ok(());
        }
        let adjust = self.entry(vcpu.now());
        let before = std::mem::replace(&mut self.adjust, adjust);
        if self.via == Via::Offset && adjust != before {
            vcpu.move_tsc(adjust - before)?;
        }
        Ok(())
    }

    fn record(&self, into: &mut super::PolicyRecord) {
        if self.tsc_method.is_some() {
            into.tsc_method = self.tsc_method;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    /// One exit after `guest` cycles: a CPUID of `leaf` (or none), `handler` cycles in
    /// the VMM; returns what a trapped read right after the entry is told, and the truth.
    fn exit(vcpu: &mut SimVcpu, clock: &mut OffsetClock, guest: u64, leaf: Option<u64>, handler: u64) -> (u64, u64) {
        vcpu.advance(guest);
        vcpu.regs.rax = leaf.unwrap_or(7);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(vcpu, exit_tsc).unwrap();
        if leaf.is_some() {
            clock.cpuid_answered(vcpu, exit_tsc).unwrap();
        }
        vcpu.advance(handler);
        clock.exit_ended(vcpu).unwrap();
        let at = vcpu.host_tsc.get();
        clock.exit_began(vcpu, at).unwrap();
        let told = clock.tsc_read(vcpu, at, TscRead::Rdtsc).unwrap();
        clock.exit_ended(vcpu).unwrap();
        (told, at)
    }

    #[test]
    fn kvm_rdtsc_hack_lowers_by_the_exit_and_the_constant_and_then_runs_ahead() {
        let mut vcpu = SimVcpu::new();
        let mut clock = OffsetClock::bleed(1_000, Via::Trap);
        let (told, truth) = exit(&mut vcpu, &mut clock, 100, Some(0), 4_000);
        assert_eq!(truth - told, 5_000, "the exit's 4,000 and the constant");
        // A CPUID of another leaf is an ordinary entry: half the constant given back, and
        // the offset, never cumulative, now puts the clock ahead.
        let (told, truth) = exit(&mut vcpu, &mut clock, 100, Some(1), 4_000);
        assert_eq!(told - truth, 500);
        for _ in 0..9 {
            let (told, truth) = exit(&mut vcpu, &mut clock, 100, None, 300);
            assert_eq!(told - truth, 500);
        }
        let (told, truth) = exit(&mut vcpu, &mut clock, 100, None, 300);
        assert_eq!(
            told, truth,
            "all 5,000 given back by ten entries: the eleventh sets the truth"
        );
    }

    #[test]
    fn kvm_rdtsc_hack_through_the_offset_moves_the_vcpus_tsc_alike() {
        let mut vcpu = SimVcpu::new();
        let mut clock = OffsetClock::bleed(1_000, Via::Offset);
        clock.arm(&mut vcpu).unwrap();
        vcpu.advance(100);
        vcpu.regs.rax = 0;
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, exit_tsc).unwrap();
        clock.cpuid_answered(&mut vcpu, exit_tsc).unwrap();
        vcpu.advance(4_000);
        clock.exit_ended(&mut vcpu).unwrap();
        assert_eq!(vcpu.guest_tsc(), vcpu.host_tsc.get() as i64 - 5_000);
    }

    #[test]
    fn hv_hides_its_overhead_until_the_timer_or_an_untagged_exit_resyncs() {
        let mut vcpu = SimVcpu::new();
        let mut clock = OffsetClock::resync(Some(800), 10_000, Via::Trap);
        let (told, truth) = exit(&mut vcpu, &mut clock, 100, Some(1), 5_000);
        assert_eq!(truth - told, 800);
        let (told, truth) = exit(&mut vcpu, &mut clock, 100, Some(1), 5_000);
        assert_eq!(truth - told, 1_600, "each hiding entry lowers it again");
        // 10,000 ticks after the last hiding entry the timer has fired: the truth.
        vcpu.advance(10_000);
        let at = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, at).unwrap();
        assert_eq!(clock.tsc_read(&mut vcpu, at, TscRead::Rdtsc).unwrap(), at);
        clock.exit_ended(&mut vcpu).unwrap();
        exit(&mut vcpu, &mut clock, 100, Some(1), 5_000);
        let (told, truth) = exit(&mut vcpu, &mut clock, 100, None, 5_000);
        assert_eq!(told, truth, "an untagged exit resyncs");
        // An overhead above 10,000 is never hidden.
        let mut big = OffsetClock::resync(Some(10_001), 10_000, Via::Trap);
        let (told, truth) = exit(&mut vcpu, &mut big, 100, Some(1), 5_000);
        assert_eq!(told, truth);
        // Measured: the shortest CPUID exit so far.
        let mut learnt = OffsetClock::resync(None, 10_000, Via::Trap);
        let (told, truth) = exit(&mut vcpu, &mut learnt, 100, Some(1), 3_000);
        assert_eq!(truth - told, 3_000);
    }
}
