//! Summary statistics of cycle samples. Percentiles use the nearest-rank method: every
//! reported value is a sample that was actually measured.

use serde::Serialize;

/// The figures reported per probe, in TSC cycles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub p5: u64,
    pub median: u64,
    pub mean: f64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

/// `None` for an empty sample set.
pub fn summarize(samples: &[u64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let sum: u128 = sorted.iter().map(|&s| u128::from(s)).sum();
    Some(Summary {
        count: sorted.len() as u64,
        min: sorted[0],
        p5: percentile_of_sorted(&sorted, 5.0),
        median: percentile_of_sorted(&sorted, 50.0),
        mean: sum as f64 / sorted.len() as f64,
        p95: percentile_of_sorted(&sorted, 95.0),
        p99: percentile_of_sorted(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
    })
}

/// Nearest-rank percentile of an ascending slice (0 for an empty one).
pub fn percentile_of_sorted(sorted: &[u64], percent: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nearest-rank median (0 for an empty slice).
pub fn median(samples: &[u64]) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    percentile_of_sorted(&sorted, 50.0)
}

/// Cycles to nanoseconds at `tsc_khz`.
pub fn cycles_to_ns(cycles: f64, tsc_khz: u32) -> f64 {
    cycles * 1_000_000.0 / f64::from(tsc_khz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_one_to_one_hundred() {
        let samples: Vec<u64> = (1..=100).rev().collect();
        let s = summarize(&samples).unwrap();
        assert_eq!(
            (s.count, s.min, s.p5, s.median, s.p95, s.p99, s.max),
            (100, 1, 5, 50, 95, 99, 100)
        );
        assert_eq!(s.mean, 50.5);
    }

    #[test]
    fn summary_of_a_single_sample_is_that_sample() {
        let s = summarize(&[42]).unwrap();
        assert_eq!(
            (s.min, s.p5, s.median, s.p99, s.max, s.mean),
            (42, 42, 42, 42, 42, 42.0)
        );
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn percentiles_are_measured_values_and_robust_to_an_outlier() {
        let mut samples = vec![100u64; 99];
        samples.push(1_000_000);
        let s = summarize(&samples).unwrap();
        assert_eq!((s.median, s.p99, s.max), (100, 100, 1_000_000));
        assert!(s.mean > 10_000.0);
        assert_eq!(median(&[3, 1, 2, 4]), 2);
    }

    #[test]
    fn huge_cycle_counts_do_not_overflow_the_mean() {
        let s = summarize(&[u64::MAX, u64::MAX]).unwrap();
        assert_eq!(s.mean, u64::MAX as f64);
    }

    #[test]
    fn nanoseconds_follow_the_tsc_frequency() {
        assert_eq!(cycles_to_ns(2_000.0, 2_000_000), 1_000.0);
    }
}
