//! ROC per rule: every rule scores each run (higher: more virtual), so moving its
//! threshold over the scores of runs that are truly virtual and truly not traces how many
//! of each it would flag — the curve its fixed threshold is one point of. The area under it
//! (AUC: the chance a virtual run scores above a host run, ties counted half) says how well
//! the score separates them at all; the point its own verdicts give says where its
//! original's threshold sits on that curve.
//!
//! The two sides: native runs on bare metal against every virtual run; where the matrix has
//! no native truth (every host a VM), a sweep's lowest value against its highest — the
//! least and the most latency staged — said as such.

use super::records::RunRecord;
use crate::detector::Verdict;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One rule's curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RuleRoc {
    pub negatives: u32,
    pub positives: u32,
    /// Area under the curve, 0.5 a coin, 1 a perfect split (0: perfectly backwards).
    pub auc: f64,
    /// (FPR, TPR) for each threshold, from flagging nothing to flagging everything.
    pub points: Vec<[f64; 2]>,
    /// (FPR, TPR) of the rule's own verdicts on the same runs: its threshold.
    pub operating: [f64; 2],
}

/// The curves of a matrix, and what they put against what.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Roc {
    pub negatives: String,
    pub positives: String,
    pub rules: BTreeMap<String, RuleRoc>,
}

/// The curves of each rule scored on both `negatives` and `positives`.
pub fn roc(
    (negatives_are, negatives): (String, &[&RunRecord]),
    (positives_are, positives): (String, &[&RunRecord]),
) -> Roc {
    // Per rule: (score, flagged by its own verdict) of each side.
    type Scored = Vec<(f64, bool)>;
    let mut by_rule: BTreeMap<&str, (Scored, Scored)> = BTreeMap::new();
    for (side, runs) in [(0, negatives), (1, positives)] {
        for run in runs {
            for v in &run.verdicts {
                let sides = by_rule.entry(v.rule.as_str()).or_default();
                let scored = if side == 0 { &mut sides.0 } else { &mut sides.1 };
                scored.push((v.score, v.verdict == Verdict::Virtual));
            }
        }
    }
    let rules = by_rule
        .into_iter()
        .filter(|(_, (neg, pos))| !neg.is_empty() && !pos.is_empty())
        .map(|(rule, (neg, pos))| (rule.to_owned(), rule_roc(&neg, &pos)))
        .collect();
    Roc {
        negatives: negatives_are,
        positives: positives_are,
        rules,
    }
}

/// The curve, AUC and operating point of one rule: sorted once, so linear-logarithmic in
/// runs (a merge may hold a million).
fn rule_roc(negatives: &[(f64, bool)], positives: &[(f64, bool)]) -> RuleRoc {
    let (n, p) = (negatives.len() as f64, positives.len() as f64);
    let sorted = |side: &[(f64, bool)]| {
        let mut scores: Vec<f64> = side.iter().map(|&(s, _)| s).collect();
        scores.sort_by(f64::total_cmp);
        scores
    };
    let (neg, pos) = (sorted(negatives), sorted(positives));
    // How many of `scores` (sorted) are at least, and below, `t`.
    let at_least = |scores: &[f64], t: f64| scores.len() - scores.partition_point(|&s| s < t);
    let below = |scores: &[f64], t: f64| scores.partition_point(|&s| s < t);
    let mut thresholds: Vec<f64> = neg.iter().chain(&pos).copied().collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let mut points = vec![[0.0, 0.0]];
    points.extend(
        thresholds
            .iter()
            .map(|&t| [at_least(&neg, t) as f64 / n, at_least(&pos, t) as f64 / p]),
    );
    // Mann-Whitney: pairs where the virtual run scores higher, ties half.
    let wins: f64 = pos
        .iter()
        .map(|&s| {
            let lower = below(&neg, s);
            let ties = neg.partition_point(|&x| x <= s) - lower;
            lower as f64 + 0.5 * ties as f64
        })
        .sum();
    let flagged = |side: &[(f64, bool)]| side.iter().filter(|&&(_, f)| f).count() as f64;
    RuleRoc {
        negatives: negatives.len() as u32,
        positives: positives.len() as u32,
        auc: wins / (n * p),
        points,
        operating: [flagged(negatives) / n, flagged(positives) / p],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::records::RunVerdict;

    fn run(truth: Verdict, score: f64, flagged: bool) -> RunRecord {
        RunRecord {
            cell: 0,
            repeat: 0,
            host: 0,
            truth,
            verdicts: vec![RunVerdict {
                rule: "robust".into(),
                verdict: if flagged { Verdict::Virtual } else { Verdict::Native },
                score,
                why: String::new(),
            }],
            cpuid_median: None,
            nop_median: None,
            floor_median: None,
            lfence8_median: None,
            tsc_khz: 1,
            cpuid_sketch: vec![],
            probe_sketches: Default::default(),
        }
    }

    #[test]
    fn a_clean_split_has_auc_one_and_the_rules_threshold_on_its_curve() {
        let hosts: Vec<RunRecord> = [1.0, 2.0, 3.0].map(|s| run(Verdict::Native, s, false)).into();
        let vms: Vec<RunRecord> = [5.0, 6.0].map(|s| run(Verdict::Virtual, s, true)).into();
        let roc = roc(
            ("hosts".into(), &hosts.iter().collect::<Vec<_>>()),
            ("vms".into(), &vms.iter().collect::<Vec<_>>()),
        );
        let robust = &roc.rules["robust"];
        assert_eq!(robust.auc, 1.0);
        assert_eq!(robust.operating, [0.0, 1.0]);
        assert_eq!(robust.points.first(), Some(&[0.0, 0.0]));
        assert_eq!(robust.points.last(), Some(&[1.0, 1.0]));
        assert!(robust.points.contains(&[0.0, 1.0]), "{:?}", robust.points);
    }

    #[test]
    fn overlapping_scores_give_the_mann_whitney_area_ties_counted_half() {
        let hosts: Vec<RunRecord> = [1.0, 3.0].map(|s| run(Verdict::Native, s, s > 2.0)).into();
        let vms: Vec<RunRecord> = [2.0, 3.0].map(|s| run(Verdict::Virtual, s, s > 2.0)).into();
        let roc = roc(
            ("h".into(), &hosts.iter().collect::<Vec<_>>()),
            ("v".into(), &vms.iter().collect::<Vec<_>>()),
        );
        // Pairs (v, h): (2,1) win, (2,3) loss, (3,1) win, (3,3) tie: 2.5 of 4.
        let robust = &roc.rules["robust"];
        assert_eq!(robust.auc, 0.625);
        assert_eq!(robust.operating, [0.5, 0.5]);
        let none = roc_of_nothing();
        assert!(none.rules.is_empty(), "no curve without both sides");
    }

    fn roc_of_nothing() -> Roc {
        let vms: Vec<RunRecord> = vec![run(Verdict::Virtual, 1.0, true)];
        roc(("h".into(), &[]), ("v".into(), &vms.iter().collect::<Vec<_>>()))
    }
}
