//! Summary statistics of cycle samples. Percentiles use the nearest-rank method: every
//! reported value is a sample that was actually measured.
//!
//! Samples are signed ([`Cycles`]): a negative sample is a TSC that ran backwards inside
//! the probe. The summaries keep its sign and count such samples apart.

use guest_payload::Cycles;
use serde::Serialize;

/// The figures reported per probe, in TSC cycles.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: Cycles,
    pub p5: Cycles,
    pub median: Cycles,
    pub mean: f64,
    pub p95: Cycles,
    pub p99: Cycles,
    pub max: Cycles,
    /// Samples whose second timestamp read below the first: the guest's TSC ran backwards.
    pub backwards: u64,
    /// The largest such step back, in cycles (0 when none).
    pub max_backwards_cycles: u64,
}

/// `None` for an empty sample set.
pub fn summarize(samples: &[Cycles]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let sum: i128 = sorted.iter().map(|&s| i128::from(s)).sum();
    let backwards = sorted.iter().take_while(|&&s| s < 0).count() as u64;
    Some(Summary {
        count: sorted.len() as u64,
        min: sorted[0],
        p5: percentile_of_sorted(&sorted, 5.0),
        median: percentile_of_sorted(&sorted, 50.0),
        mean: sum as f64 / sorted.len() as f64,
        p95: percentile_of_sorted(&sorted, 95.0),
        p99: percentile_of_sorted(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
        backwards,
        max_backwards_cycles: if backwards > 0 { sorted[0].unsigned_abs() } else { 0 },
    })
}

/// Nearest-rank percentile of an ascending slice (the default value for an empty one).
pub fn percentile_of_sorted<T: Copy + Default>(sorted: &[T], percent: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nearest-rank percentile of unsorted values.
pub fn percentile<T: Copy + Default + Ord>(values: &[T], percent: f64) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    percentile_of_sorted(&sorted, percent)
}

/// Nearest-rank median (the default value for an empty slice).
pub fn median<T: Copy + Default + Ord>(values: &[T]) -> T {
    percentile(values, 50.0)
}

/// Cycles to nanoseconds at `tsc_khz`.
pub fn cycles_to_ns(cycles: f64, tsc_khz: u32) -> f64 {
    cycles * 1_000_000.0 / f64::from(tsc_khz)
}

/// SplitMix64: tiny, fast, and the same sequence for the same seed on every platform.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Box–Muller.
    pub fn standard_normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A bounded record of a stream: every item up to `capacity`, then a uniform sample of
/// that size (Algorithm R: the n-th item replaces a kept one with probability capacity/n),
/// so a guest that floods an exit kind cannot grow the VMM's memory. The count stays exact.
#[derive(Clone, Debug)]
pub struct Reservoir<T> {
    kept: Vec<T>,
    capacity: usize,
    count: u64,
    rng: SplitMix64,
}

impl<T> Reservoir<T> {
    /// `reserve` items are allocated now (no reallocation inside a timed exit below it).
    pub fn new(capacity: usize, reserve: usize, seed: u64) -> Self {
        Self {
            kept: Vec::with_capacity(reserve.min(capacity)),
            capacity,
            count: 0,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn record(&mut self, item: T) {
        if self.kept.len() < self.capacity {
            self.kept.push(item);
        } else {
            let slot = self.rng.next_u64() % (self.count + 1);
            if let Some(kept) = self.kept.get_mut(slot as usize) {
                *kept = item;
            }
        }
        self.count += 1;
    }

    /// Items recorded in all.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The items kept: all of them up to the capacity, in order.
    pub fn kept(&self) -> &[T] {
        &self.kept
    }

    /// Raises the capacity to at least `capacity`, reserving room for it.
    pub fn grow_to(&mut self, capacity: usize) {
        if capacity > self.capacity {
            self.kept.reserve(capacity - self.kept.len());
            self.capacity = capacity;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_one_to_one_hundred() {
        let samples: Vec<Cycles> = (1..=100).rev().collect();
        let s = summarize(&samples).unwrap();
        assert_eq!(
            (s.count, s.min, s.p5, s.median, s.p95, s.p99, s.max),
            (100, 1, 5, 50, 95, 99, 100)
        );
        assert_eq!(s.mean, 50.5);
        assert_eq!((s.backwards, s.max_backwards_cycles), (0, 0));
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
        let mut samples = vec![100; 99];
        samples.push(1_000_000);
        let s = summarize(&samples).unwrap();
        assert_eq!((s.median, s.p99, s.max), (100, 100, 1_000_000));
        assert!(s.mean > 10_000.0);
        assert_eq!(median(&[3, 1, 2, 4]), 2);
        assert_eq!(median::<u64>(&[]), 0);
    }

    #[test]
    fn a_tsc_that_ran_backwards_stays_negative_and_is_counted() {
        // What the guest records when its TSC is moved back by more than the probe cost:
        // end - start below zero. Wrapped into a u64 this read 1.8e19.
        let s = summarize(&[120, -13_000, 95, -40, 101]).unwrap();
        assert_eq!((s.min, s.median, s.max), (-13_000, 95, 120));
        assert_eq!((s.backwards, s.max_backwards_cycles), (2, 13_000));
        assert!(s.mean < 0.0);
    }

    #[test]
    fn extreme_cycle_counts_do_not_overflow_the_mean() {
        let s = summarize(&[i64::MAX, i64::MAX]).unwrap();
        assert_eq!(s.mean, i64::MAX as f64);
        let s = summarize(&[i64::MIN]).unwrap();
        assert_eq!(s.max_backwards_cycles, 1 << 63);
    }

    #[test]
    fn nanoseconds_follow_the_tsc_frequency() {
        assert_eq!(cycles_to_ns(2_000.0, 2_000_000), 1_000.0);
    }
}
