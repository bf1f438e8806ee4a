//! Sweeps: cells that differ only in one number (`inject-ns:250`, `inject-ns:500`, … or an
//! evader's argument), read as a curve per rule — how often it flags the runs against the
//! swept value, each rate with its exact 95% interval — and where each rule starts to
//! detect: the smallest value it flags half, and 95%, of the time, bracketed by what the
//! intervals allow. On a sweep of injected exit latency that is the minimum detectable
//! latency of each detector on the host.

use super::confusion::VerdictCounts;
use crate::detector::Verdict;
use crate::stats::{proportion_interval, Interval};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A curve needs at least this many values to be one.
const MIN_POINTS: usize = 3;

/// One cell as a sweep reads it.
pub struct SweptCell<'a> {
    /// Its index among the matrix's cells.
    pub index: usize,
    pub mode: &'a str,
    pub shaping: &'a str,
    pub evasion: &'a str,
    pub busy: u16,
    pub truth: Verdict,
    pub rules: BTreeMap<&'a str, VerdictCounts>,
}

/// One rule at one swept value.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepPoint {
    pub value: u64,
    pub flagged: u32,
    pub runs: u32,
    pub rate: f64,
    pub interval: Option<Interval>,
}

/// Where a curve reaches a detection rate: on a curve that rises with the value (more
/// latency, easier to see), the smallest swept value from which every point's rate is at
/// least it (`at`), and what the intervals allow — from where every upper bound is
/// (`earliest`) and every lower bound is (`surely`); on one that falls (an evader's
/// divider: more, harder to see), the largest value up to which it holds. `None`: nowhere.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Crossing {
    pub at: Option<u64>,
    pub earliest: Option<u64>,
    pub surely: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepCurve {
    pub points: Vec<SweepPoint>,
    /// The rate at the largest value is below that at the smallest: the crossings are
    /// read from the small end ("up to"), not the large ("from").
    pub falls: bool,
    /// Flagged half the time, and 95% of the time.
    pub half: Crossing,
    pub most: Crossing,
}

/// One sweep: what is swept, on which cells, and each rule's curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sweep {
    /// The swept parameter (`inject-ns`, `rdtsc-kvm-handler`).
    pub swept: String,
    /// The cells, the swept value shown as `*`.
    pub cells: String,
    pub truth: Verdict,
    pub values: Vec<u64>,
    pub rules: BTreeMap<String, SweepCurve>,
    /// The matrix cells of each value (derived again on every read, never stored).
    #[serde(skip)]
    pub cells_at: BTreeMap<u64, Vec<usize>>,
}

/// `kind:N` as (kind, N).
fn numbered(label: &str) -> Option<(&str, u64)> {
    let (kind, value) = label.split_once(':')?;
    Some((kind, value.parse().ok()?))
}

/// Every sweep among `cells`: groups of at least three cells alike but for the number in
/// their shaping, or in their evasion.
pub fn sweeps<'a>(cells: impl IntoIterator<Item = SweptCell<'a>>) -> Vec<Sweep> {
    type Key = (String, String, Verdict);
    type AtValue = (BTreeMap<String, VerdictCounts>, Vec<usize>);
    let mut groups: BTreeMap<Key, BTreeMap<u64, AtValue>> = BTreeMap::new();
    for cell in cells {
        let mut add = |swept: &str, label: String, value: u64| {
            let (at, indices) = groups
                .entry((swept.to_owned(), label, cell.truth))
                .or_default()
                .entry(value)
                .or_default();
            indices.push(cell.index);
            for (rule, counts) in &cell.rules {
                let sum = at.entry((*rule).to_owned()).or_default();
                sum.virtual_ += counts.virtual_;
                sum.native += counts.native;
                sum.unsure += counts.unsure;
            }
        };
        let evade = |evasion: &str| match evasion {
            "none" => String::new(),
            e => format!(" | evade {e}"),
        };
        if let Some((kind, value)) = numbered(cell.shaping) {
            let label = format!("{} | {kind}:*{} | busy {}", cell.mode, evade(cell.evasion), cell.busy);
            add(kind, label, value);
        }
        if let Some((name, value)) = numbered(cell.evasion) {
            let label = format!("{} | {} | evade {name}:* | busy {}", cell.mode, cell.shaping, cell.busy);
            add(name, label, value);
        }
    }
    groups
        .into_iter()
        .filter(|(_, by_value)| by_value.len() >= MIN_POINTS)
        .map(|((swept, cells, truth), by_value)| {
            let values: Vec<u64> = by_value.keys().copied().collect();
            let cells_at = by_value.iter().map(|(&v, (_, cells))| (v, cells.clone())).collect();
            let mut rules: BTreeMap<String, Vec<SweepPoint>> = BTreeMap::new();
            for (&value, (counts, _)) in &by_value {
                for (rule, c) in counts {
                    rules.entry(rule.clone()).or_default().push(SweepPoint {
                        value,
                        flagged: c.virtual_,
                        runs: c.total(),
                        rate: f64::from(c.virtual_) / f64::from(c.total().max(1)),
                        interval: proportion_interval(c.virtual_, c.total()),
                    });
                }
            }
            let rules = rules
                .into_iter()
                .map(|(rule, points)| {
                    let falls = match (points.first(), points.last()) {
                        (Some(low), Some(high)) => high.rate < low.rate,
                        _ => false,
                    };
                    let curve = SweepCurve {
                        half: crossing(&points, 0.5, falls),
                        most: crossing(&points, 0.95, falls),
                        falls,
                        points,
                    };
                    (rule, curve)
                })
                .collect();
            Sweep {
                swept,
                cells,
                truth,
                values,
                rules,
                cells_at,
            }
        })
        .collect()
}

/// Where `points` (by value) reach `rate` and stay there, from the large end (`falls`:
/// from the small end).
fn crossing(points: &[SweepPoint], rate: f64, falls: bool) -> Crossing {
    // The value nearest the far end from which `holds` is true of every point out to it.
    let from = |holds: &dyn Fn(&SweepPoint) -> bool| {
        let ordered: Vec<&SweepPoint> = if falls {
            points.iter().collect()
        } else {
            points.iter().rev().collect()
        };
        let run = ordered.iter().take_while(|p| holds(p)).count();
        (run > 0).then(|| ordered[run - 1].value)
    };
    Crossing {
        at: from(&|p| p.rate >= rate),
        earliest: from(&|p| p.interval.is_some_and(|i| i.upper >= rate)),
        surely: from(&|p| p.interval.is_some_and(|i| i.lower >= rate)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell<'a>(shaping: &'a str, flagged: u32, of: u32) -> SweptCell<'a> {
        SweptCell {
            index: 0,
            mode: "paravirt",
            shaping,
            evasion: "none",
            busy: 0,
            truth: Verdict::Virtual,
            rules: [(
                "fixed-threshold",
                VerdictCounts {
                    virtual_: flagged,
                    native: of - flagged,
                    unsure: 0,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn a_sweep_gives_each_rule_a_curve_and_where_it_starts_to_detect() {
        let cells = [
            cell("inject-ns:100", 0, 20),
            cell("inject-ns:200", 2, 20),
            cell("inject-ns:300", 11, 20),
            cell("inject-ns:400", 20, 20),
            cell("inject-ns:500", 20, 20),
            cell("none", 0, 20),
        ];
        let sweeps = sweeps(cells);
        assert_eq!(sweeps.len(), 1);
        let sweep = &sweeps[0];
        assert_eq!(sweep.swept, "inject-ns");
        assert_eq!(sweep.cells, "paravirt | inject-ns:* | busy 0");
        assert_eq!(sweep.values, [100, 200, 300, 400, 500]);
        let curve = &sweep.rules["fixed-threshold"];
        assert_eq!(curve.points.len(), 5);
        // 11 of 20 is over half, its interval [0.32, 0.77] both sides of it.
        assert_eq!(curve.half.at, Some(300));
        assert_eq!(curve.half.earliest, Some(300), "2 of 20: upper bound 0.32");
        assert_eq!(curve.half.surely, Some(400));
        // 20 of 20: the lower bound is 0.83, short of 0.95: never sure at 95%.
        assert_eq!(curve.most.at, Some(400));
        assert_eq!(curve.most.surely, None);
    }

    #[test]
    fn two_values_are_no_curve_and_evader_arguments_sweep_too() {
        let two = [cell("inject-ns:100", 0, 5), cell("inject-ns:200", 5, 5)];
        assert!(sweeps(two).is_empty());
        let evader = |value: &'static str, flagged| SweptCell {
            evasion: value,
            ..cell("none", flagged, 10)
        };
        let sweeps = sweeps([
            evader("rdtsc-kvm-handler:1", 10),
            evader("rdtsc-kvm-handler:8", 10),
            evader("rdtsc-kvm-handler:16", 0),
        ]);
        assert_eq!(sweeps[0].cells, "paravirt | none | evade rdtsc-kvm-handler:* | busy 0");
        assert_eq!(sweeps[0].values, [1, 8, 16]);
        // Detection falls with the divider: flagged up to 8, not at 16.
        let curve = &sweeps[0].rules["fixed-threshold"];
        assert!(curve.falls);
        assert_eq!((curve.half.at, curve.half.surely), (Some(8), Some(8)));
    }
}
