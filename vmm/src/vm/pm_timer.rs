//! The guest's ACPI PM timer (`guest_payload::ports::PM_TIMER`): a 32-bit count at
//! 3.579545 MHz from the host's monotonic clock, the wall clock a guest reads beside its
//! TSC. Natively the same count is the host's equivalent of the guest's port.

use guest_payload::clocks::PM_TIMER_HZ;
use std::sync::OnceLock;
use std::time::Instant;

/// Where the count started: the first time this process read it (a PM timer counts from
/// power-on; only differences mean anything).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The count now, wrapping at 32 bits as a PM timer with `TMR_VAL_EXT` does.
pub fn count() -> u32 {
    ticks_of(epoch().elapsed().as_nanos())
}

fn ticks_of(nanos: u128) -> u32 {
    (nanos * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_second_is_3579545_ticks_and_the_count_wraps_at_32_bits() {
        assert_eq!(ticks_of(1_000_000_000), 3_579_545);
        let wrap_ns = (1u128 << 32) * 1_000_000_000 / u128::from(PM_TIMER_HZ) + 1;
        assert!(ticks_of(wrap_ns) < 10);
        let a = count();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(count().wrapping_sub(a) >= 7_000);
    }
}
