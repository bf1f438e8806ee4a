//! The arithmetic of latency shaping, free of KVM so it can be tested on a simulated clock.
//!
//! A CPUID the VMM handles costs the guest `residue + handler` cycles of its TSC: the
//! kernel's exit and entry paths plus the guest-side instructions (`residue`, calibrated
//! once per run), and the time userspace spent handling the exit (`handler`, measured per
//! exit). Moving the guest TSC by `delta` during the exit makes the guest see
//! `residue + handler + delta`.

/// The TSC move that makes the guest see exactly `target` cycles for this exit.
pub fn hide_adjustment(target: u64, handler: u64, residue: u64) -> i64 {
    target as i64 - (handler as i64 + residue as i64)
}

/// The kernel entry/exit residue: what the guest saw beyond what the handler spent, from
/// a calibration run that took the same path. The guest's samples and the VMM's exits
/// pair one to one, in order (the exits of the warm-up samples come first), so the
/// residue is the median of per-exit differences — not a difference of medians, which is
/// biased when handler time and guest-seen cost move together, as they do.
pub fn residue(guest_seen: &[u64], handler: &[u64]) -> u64 {
    let warmup_exits = handler.len().saturating_sub(guest_seen.len());
    let differences: Vec<u64> = guest_seen
        .iter()
        .zip(&handler[warmup_exits..])
        .map(|(g, h)| g.saturating_sub(*h))
        .collect();
    crate::stats::median(&differences)
}

/// Spins until the TSC read by `now` reaches `start + cycles`; returns the cycles spent.
pub fn spin_until(start: u64, cycles: u64, mut now: impl FnMut() -> u64) -> u64 {
    let deadline = start.saturating_add(cycles);
    loop {
        let t = now();
        if t >= deadline {
            return t - start;
        }
        std::hint::spin_loop();
    }
}

/// Converts nanoseconds to TSC cycles at `tsc_khz`.
pub fn ns_to_cycles(ns: u64, tsc_khz: u32) -> u64 {
    (u128::from(ns) * u128::from(tsc_khz) / 1_000_000) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest whose TSC is the host's plus an offset, taking exits that cost `residue`
    /// in the kernel and `handler` in userspace, as the VMM's shaping sees them.
    struct SimulatedVcpu {
        host_tsc: u64,
        offset: i64,
        residue: u64,
    }

    impl SimulatedVcpu {
        fn guest_tsc(&self) -> u64 {
            (self.host_tsc as i64 + self.offset) as u64
        }

        /// One trapped CPUID; `shape` sees the handler's cost and returns the TSC move.
        /// Returns the cost the guest measured.
        fn trapped_cpuid(&mut self, handler: u64, shape: impl FnOnce(u64) -> i64) -> u64 {
            let before = self.guest_tsc();
            self.host_tsc += self.residue + handler;
            self.offset += shape(handler);
            self.guest_tsc() - before
        }
    }

    #[test]
    fn hiding_brings_every_exit_to_the_target_whatever_the_handler_costs() {
        let mut vcpu = SimulatedVcpu {
            host_tsc: 1 << 40,
            offset: -5_000,
            residue: 2_500,
        };
        for handler in [10_000, 31_000, 7_777, 150_000] {
            let seen = vcpu.trapped_cpuid(handler, |h| hide_adjustment(900, h, 2_500));
            assert_eq!(seen, 900, "handler {handler}");
        }
    }

    #[test]
    fn calibrated_residue_is_what_hiding_needs() {
        let mut vcpu = SimulatedVcpu {
            host_tsc: 0,
            offset: 0,
            residue: 3_300,
        };
        // Calibration: move by zero, observe the guest's cost and the handler's.
        let handlers = [13_000, 90_000, 15_000, 400_000, 14_000];
        let seen: Vec<u64> = handlers.iter().map(|&h| vcpu.trapped_cpuid(h, |_| 0)).collect();
        // Two warm-up exits the guest did not keep come first.
        let calibrated = residue(&seen[2..], &handlers);
        assert_eq!(calibrated, 3_300);
        assert_eq!(
            vcpu.trapped_cpuid(20_000, |h| hide_adjustment(1_200, h, calibrated)),
            1_200
        );
    }

    #[test]
    fn virtual_injection_adds_exactly_its_cycles() {
        let mut vcpu = SimulatedVcpu {
            host_tsc: 0,
            offset: 0,
            residue: 1_000,
        };
        let plain = vcpu.trapped_cpuid(5_000, |_| 0);
        let injected = vcpu.trapped_cpuid(5_000, |_| 40_000);
        assert_eq!(injected - plain, 40_000);
    }

    #[test]
    fn a_target_above_the_natural_cost_moves_the_tsc_forward() {
        assert_eq!(hide_adjustment(50_000, 10_000, 5_000), 35_000);
        assert_eq!(hide_adjustment(0, 10_000, 5_000), -15_000);
        assert_eq!(residue(&[100], &[500]), 0, "never negative");
        assert_eq!(residue(&[], &[]), 0);
    }

    #[test]
    fn spinning_stops_at_the_deadline_of_a_simulated_clock() {
        let mut clock = 1_000u64;
        let spent = spin_until(1_000, 250, || {
            clock += 100;
            clock
        });
        assert_eq!(spent, 300, "the first reading at or past the deadline");
        assert_eq!(spin_until(10, 0, || 10), 0);
    }

    #[test]
    fn nanoseconds_become_cycles_at_the_tsc_rate() {
        assert_eq!(ns_to_cycles(1_000, 2_500_000), 2_500);
        assert_eq!(ns_to_cycles(u64::MAX, 1), u64::MAX / 1_000_000);
    }
}
