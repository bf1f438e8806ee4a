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

/// A 95% confidence interval of a proportion: exact (Clopper–Pearson), so never narrower
/// than the runs support — the Wilson interval is shorter and can undercover at the
/// extremes, where a detector's rates usually are (0 of 10: Wilson's upper bound is 0.28,
/// the exact one 0.31).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{:.2}, {:.2}]", self.lower, self.upper)
    }
}

/// Each tail of the 95% interval.
const TAIL: f64 = 0.025;

/// P(X <= k) for X ~ Binomial(n, p), summed in log space (n up to millions).
fn binomial_cdf(k: u32, n: u32, p: f64) -> f64 {
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return if k >= n { 1.0 } else { 0.0 };
    }
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut sum = 0.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            ln_choose += f64::from(n - i + 1).ln() - f64::from(i).ln();
        }
        sum += (ln_choose + f64::from(i) * ln_p + f64::from(n - i) * ln_q).exp();
    }
    sum.min(1.0)
}

/// The p in (0, 1) where the decreasing `f(p)` crosses `target`, by bisection.
fn solve_decreasing(f: impl Fn(f64) -> f64, target: f64) -> f64 {
    let (mut low, mut high) = (0.0_f64, 1.0_f64);
    for _ in 0..64 {
        let mid = (low + high) / 2.0;
        if f(mid) > target {
            low = mid;
        } else {
            high = mid;
        }
    }
    (low + high) / 2.0
}

/// The exact 95% interval of `successes` in `trials`; `None` without trials.
pub fn proportion_interval(successes: u32, trials: u32) -> Option<Interval> {
    if trials == 0 || successes > trials {
        return None;
    }
    let lower = if successes == 0 {
        0.0
    } else {
        solve_decreasing(|p| binomial_cdf(successes - 1, trials, p), 1.0 - TAIL)
    };
    let upper = if successes == trials {
        1.0
    } else {
        solve_decreasing(|p| binomial_cdf(successes, trials, p), TAIL)
    };
    Some(Interval { lower, upper })
}

/// How many trials, every one a success, it takes for the interval's lower bound to reach
/// `rate`: the fewest runs that can support `tpr >= rate` (0.99 takes 368).
pub fn trials_to_support(rate: f64) -> u64 {
    if rate <= TAIL {
        return 1;
    }
    if rate >= 1.0 {
        return u64::MAX;
    }
    // All n succeed: the lower bound is TAIL^(1/n).
    (TAIL.ln() / rate.ln()).ceil() as u64
}

/// A distribution pooled from runs' sketches (each run's order statistics), every run
/// weighing the same however many points it kept.
#[derive(Clone, Debug, Default)]
pub struct Pooled {
    /// (value, weight), sorted by value; the weights sum to one.
    points: Vec<(Cycles, f64)>,
}

impl Pooled {
    pub fn new<'a>(sketches: impl IntoIterator<Item = &'a [Cycles]>) -> Self {
        let sketches: Vec<&[Cycles]> = sketches.into_iter().filter(|s| !s.is_empty()).collect();
        let runs = sketches.len() as f64;
        let mut points: Vec<(Cycles, f64)> = sketches
            .iter()
            .flat_map(|s| s.iter().map(move |&v| (v, 1.0 / (runs * s.len() as f64))))
            .collect();
        points.sort_by_key(|&(v, _)| v);
        Self { points }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The smallest value with at least `percent`% of the weight at or below it.
    pub fn percentile(&self, percent: f64) -> Option<Cycles> {
        let target = percent / 100.0;
        let mut seen = 0.0;
        for &(value, weight) in &self.points {
            seen += weight;
            if seen >= target - 1e-12 {
                return Some(value);
            }
        }
        self.points.last().map(|&(v, _)| v)
    }

    /// The two-sample Kolmogorov–Smirnov distance: the largest gap between the two
    /// cumulative distributions, 0 (alike) to 1 (no overlap). From sketches of 200 points
    /// a run it is exact to within 1/200 per run's quantisation.
    pub fn ks_distance(&self, other: &Pooled) -> Option<f64> {
        if self.is_empty() || other.is_empty() {
            return None;
        }
        let (a, b) = (&self.points, &other.points);
        let (mut i, mut j) = (0, 0);
        let (mut fa, mut fb, mut d) = (0.0_f64, 0.0_f64, 0.0_f64);
        while i < a.len() || j < b.len() {
            // Step both past every point at the next value, then compare.
            let next = match (a.get(i), b.get(j)) {
                (Some(&(x, _)), Some(&(y, _))) => x.min(y),
                (Some(&(x, _)), None) => x,
                (None, Some(&(y, _))) => y,
                (None, None) => break,
            };
            while let Some(&(_, w)) = a.get(i).filter(|(x, _)| *x == next) {
                fa += w;
                i += 1;
            }
            while let Some(&(_, w)) = b.get(j).filter(|(y, _)| *y == next) {
                fb += w;
                j += 1;
            }
            d = d.max((fa - fb).abs());
        }
        // The weights' sums drift in the last bits: to nine decimals, 1 is 1.
        Some(((d * 1e9).round() / 1e9).min(1.0))
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

    #[test]
    fn exact_intervals_match_known_values() {
        let none = proportion_interval(0, 10).unwrap();
        assert_eq!(none.lower, 0.0);
        assert!((none.upper - 0.3085).abs() < 1e-3, "{none}");
        let all = proportion_interval(6, 6).unwrap();
        assert!((all.lower - 0.5407).abs() < 1e-3 && all.upper == 1.0, "{all}");
        // 8 of 10: R's binom.test gives [0.4439, 0.9748].
        let eight = proportion_interval(8, 10).unwrap();
        assert!(
            (eight.lower - 0.4439).abs() < 1e-3 && (eight.upper - 0.9748).abs() < 1e-3,
            "{eight}"
        );
        // Large n stays finite and tight: 500 of 1000.
        let half = proportion_interval(500, 1000).unwrap();
        assert!(
            (half.lower - 0.4685).abs() < 1e-3 && (half.upper - 0.5315).abs() < 1e-3,
            "{half}"
        );
        assert_eq!(proportion_interval(0, 0), None);
        assert_eq!(proportion_interval(3, 2), None);
    }

    #[test]
    fn trials_to_support_a_rate_are_where_the_lower_bound_reaches_it() {
        let n = trials_to_support(0.99);
        assert_eq!(n, 368);
        let n32 = u32::try_from(n).unwrap();
        assert!(proportion_interval(n32, n32).unwrap().lower >= 0.99);
        assert!(proportion_interval(n32 - 1, n32 - 1).unwrap().lower < 0.99);
        assert_eq!(trials_to_support(0.0), 1);
    }

    #[test]
    fn pooled_sketches_weigh_runs_alike_and_give_ks_distances() {
        let low: Vec<Cycles> = (0..200).collect();
        let high: Vec<Cycles> = (1000..1200).collect();
        let a = Pooled::new([low.as_slice()]);
        let b = Pooled::new([high.as_slice()]);
        assert_eq!(a.ks_distance(&b), Some(1.0), "no overlap");
        assert_eq!(a.ks_distance(&a), Some(0.0));
        // A run of 4 points weighs as much as a run of 200.
        let four = [5000, 5000, 5000, 5000];
        let mixed = Pooled::new([low.as_slice(), four.as_slice()]);
        assert_eq!(mixed.percentile(50.0), Some(199));
        assert_eq!(mixed.percentile(51.0), Some(5000));
        assert_eq!(mixed.percentile(99.0), Some(5000));
        let d = mixed.ks_distance(&a).unwrap();
        assert!((d - 0.5).abs() < 1e-9, "half the weight moved: {d}");
        // Half-overlapping uniforms.
        let shifted: Vec<Cycles> = (100..300).collect();
        let d = a.ks_distance(&Pooled::new([shifted.as_slice()])).unwrap();
        assert!((d - 0.5).abs() < 1e-9, "{d}");
        assert_eq!(Pooled::new([&[][..]]).ks_distance(&a), None);
    }
}
