//! Samples to decision: how many samples a rule needs before its verdict stops changing —
//! a cost figure for detectors (VMAware's TIMER takes 5 × 500–1000 pairs, pafish 10 with
//! 500 ms sleeps), found from the run's own samples. For each size, the run's samples are
//! resampled (with replacement, each probe's samples and counter ticks kept in pairs) a
//! fixed number of times and the rule judged on each resample; the rule has decided at the
//! smallest size from which 95% of resamples, at that size and every larger one tried, give
//! the verdict of the whole run.

use super::verdict::{Evidence, RuleVerdict, Verdict};
use super::{Calibration, RULES};
use crate::results::ProbeSamples;
use serde::Serialize;

/// The sizes tried, each up to the run's own count.
pub const SIZES: [usize; 13] = [
    5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
];
/// The largest size tried: a run of millions is judged on resamples of this many at most.
pub const LARGEST: usize = 50_000;
/// Resamples judged at each size.
pub const RESAMPLES: u32 = 20;
/// The share of resamples that must agree with the whole run.
pub const AGREEMENT: f64 = 0.95;

/// One rule's figure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub rule: &'static str,
    /// The whole run's verdict: an unsure one has nothing to decide (`samples` `None`).
    pub verdict: Verdict,
    /// The fewest samples per probe that decide it: `Some(0)` for a rule whose verdict
    /// needs none (the same with every sample taken away); `None` where even the run's own
    /// count (`of`), or [`LARGEST`] of a longer run, did not.
    pub samples: Option<usize>,
    /// The most samples a probe of the rule had in the run.
    pub of: usize,
}

/// SplitMix64: a fixed, seeded sequence, so that a report's figure can be reproduced.
struct Sequence(u64);

impl Sequence {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Each rule of `verdicts` (the whole run's), with the samples it took to decide.
pub fn samples_to_decision(evidence: &Evidence, calibration: &Calibration, verdicts: &[RuleVerdict]) -> Vec<Decision> {
    let mut sequence = Sequence(0x5eed_d3c1_5105);
    verdicts
        .iter()
        .filter_map(|whole| RULES.iter().find(|r| r.name == whole.rule).map(|rule| (rule, whole)))
        .map(|(rule, whole)| {
            // A rule that names no probe (tsc-monotonic) reads them all.
            let lengths = evidence
                .samples
                .iter()
                .filter(|(p, _)| rule.probes.is_empty() || rule.probes.contains(p))
                .map(|(_, s)| s.len());
            let of = lengths.max().unwrap_or(0);
            if whole.verdict == Verdict::Unsure {
                return Decision {
                    rule: rule.name,
                    verdict: whole.verdict,
                    samples: None,
                    of,
                };
            }
            // Size 0 first: a rule that gives the same verdict without any sample (the
            // hypervisor bit; tsc-monotonic where nothing ran backwards) needs none.
            let top = of.min(LARGEST);
            let sizes: Vec<usize> = [0]
                .into_iter()
                .chain(SIZES.iter().copied().filter(|&s| s < top))
                .chain((top > 0).then_some(top))
                .collect();
            let agrees: Vec<bool> = sizes
                .iter()
                .map(|&size| {
                    let tries = if size == 0 { 1 } else { RESAMPLES };
                    let same = (0..tries)
                        .filter(|_| {
                            let (samples, ticks) = resample(evidence, size, &mut sequence);
                            let one = Evidence {
                                samples: &samples,
                                ticks: &ticks,
                                ..*evidence
                            };
                            (rule.judge)(&one, calibration).verdict == whole.verdict
                        })
                        .count();
                    f64::from(same as u32) >= AGREEMENT * f64::from(tries)
                })
                .collect();
            // The smallest size from which every larger one agrees too.
            let tail = agrees.iter().rev().take_while(|&&a| a).count();
            Decision {
                rule: rule.name,
                verdict: whole.verdict,
                samples: (tail > 0).then(|| sizes[sizes.len() - tail]),
                of,
            }
        })
        .collect()
}

/// `size` samples of each probe drawn with replacement (never more than it has), its
/// counter ticks drawn with them.
fn resample(evidence: &Evidence, size: usize, sequence: &mut Sequence) -> (ProbeSamples, ProbeSamples) {
    let mut samples = ProbeSamples::new();
    let mut ticks = ProbeSamples::new();
    for (&probe, values) in evidence.samples {
        // Size 0 takes the probe away, as a run without it has none.
        if size == 0 {
            continue;
        }
        if values.is_empty() {
            samples.insert(probe, Vec::new());
            continue;
        }
        let paired = evidence.ticks.get(&probe).filter(|t| t.len() == values.len());
        let picks: Vec<usize> = (0..size.min(values.len()))
            .map(|_| sequence.below(values.len()))
            .collect();
        samples.insert(probe, picks.iter().map(|&i| values[i]).collect());
        if let Some(t) = paired {
            ticks.insert(probe, picks.iter().map(|&i| t[i]).collect());
        }
    }
    (samples, ticks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::evaluate;
    use guest_payload::Probe;

    fn evidence(samples: &ProbeSamples) -> Evidence<'_> {
        static EMPTY: std::sync::OnceLock<ProbeSamples> = std::sync::OnceLock::new();
        Evidence {
            samples,
            ticks: EMPTY.get_or_init(ProbeSamples::new),
            counter_rate: None,
            cpuid: &[],
            site_bytes: &[],
            tsc_khz: 2_000_000,
            cpuid_leaf: 0,
            payload: None,
            patched_for_an_evader: None,
            clocks: None,
        }
    }

    /// A clear split is decided from the fewest samples; a run whose CPUID sits on the
    /// ratio rule's line takes more, or never settles; a rule of no timing needs none.
    #[test]
    fn clear_runs_decide_early_and_a_run_on_the_line_late_or_never() {
        let mut clear = ProbeSamples::new();
        clear.insert(Probe::Cpuid, vec![30_000; 2_000]);
        clear.insert(Probe::Lfence8, vec![100; 2_000]);
        let e = evidence(&clear);
        let whole = evaluate(&e, &Calibration::uncalibrated());
        let decisions = samples_to_decision(&e, &Calibration::uncalibrated(), &whole);
        let of = |rule: &str| decisions.iter().find(|d| d.rule == rule).unwrap().clone();
        assert_eq!(of("tsc-lfence-ratio").samples, Some(5), "{decisions:?}");
        assert_eq!(of("tsc-lfence-ratio").of, 2_000);
        assert_eq!(of("code-integrity").samples, None, "no CPUID sites recorded: unsure");
        assert_eq!(of("code-integrity").verdict, Verdict::Unsure);
        // Without samples it is unsure: "native" needs a few.
        assert_eq!(of("tsc-monotonic").samples, Some(5), "nothing ran backwards");
        // A TSC that ran backwards once in 2,000: resamples of a few miss it.
        let mut backwards = clear.clone();
        backwards.get_mut(&Probe::Cpuid).unwrap()[7] = -5;
        let e = evidence(&backwards);
        let whole = evaluate(&e, &Calibration::uncalibrated());
        let monotonic = samples_to_decision(&e, &Calibration::uncalibrated(), &whole)
            .into_iter()
            .find(|d| d.rule == "tsc-monotonic")
            .unwrap();
        assert!(monotonic.samples.is_none_or(|n| n >= 1_000), "{monotonic:?}");

        // CPUID alternating either side of 2.5 × the LFENCE cost: a coin per resample.
        let mut split = ProbeSamples::new();
        split.insert(
            Probe::Cpuid,
            (0..2_000).map(|i| if i % 2 == 0 { 200 } else { 300 }).collect(),
        );
        split.insert(Probe::Lfence8, vec![100; 2_000]);
        let e = evidence(&split);
        let whole = evaluate(&e, &Calibration::uncalibrated());
        let ratio = samples_to_decision(&e, &Calibration::uncalibrated(), &whole)
            .into_iter()
            .find(|d| d.rule == "tsc-lfence-ratio")
            .unwrap();
        assert!(ratio.samples.is_none_or(|s| s >= 50), "{ratio:?}");
    }
}
