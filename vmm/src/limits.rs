//! One set of limits, for the command line and every file format alike: a matrix, a
//! profile or a calibration can ask for no more than `vmm run` can. Each bound is far above
//! any useful experiment and far below what would exhaust memory, overflow a size, or spin
//! past the watchdog.

/// Samples per probe: beyond this the samples alone outgrow the guest's mapped gigabyte.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Warm-up samples per probe.
pub const MAX_WARMUP: u32 = 1_000_000;
/// Repeats of one validation cell.
pub const MAX_REPEATS: u32 = 10_000;
/// Jobs (cells × repeats) of one validation.
pub const MAX_JOBS: u64 = 1_000_000;
/// Host threads burning CPU (`--busy`).
pub const MAX_BUSY: u16 = 256;
/// Nanoseconds a handler may spin per exit (`--inject-ns`): one second.
pub const MAX_INJECT_NS: u64 = 1_000_000_000;
/// Cycles per exit for injection, virtual injection, hide targets and profile values.
pub const MAX_SHAPING_CYCLES: u64 = 10_000_000_000;
/// Seconds of `--timeout`.
pub const MAX_TIMEOUT_S: f64 = 86_400.0;
pub const MIN_TIMEOUT_S: f64 = 0.1;

/// `value` within `1..=max`, or why not, naming `what`.
pub fn check_range(what: &str, value: u64, min: u64, max: u64) -> Result<u64, String> {
    if value < min || value > max {
        return Err(format!("{what} must be {min}..={max}, not {value}"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_run_allowed_sizes_without_overflow() {
        // Both CPUID probes' samples and warm-ups, as u32 sums would have wrapped.
        let exits = u64::from(MAX_ITERATIONS) * 2 + u64::from(MAX_WARMUP);
        assert!(exits < u64::from(u32::MAX));
        assert!(check_range("x", 0, 1, 5).unwrap_err().contains("1..=5"));
        assert_eq!(check_range("x", 5, 1, 5), Ok(5));
    }
}
