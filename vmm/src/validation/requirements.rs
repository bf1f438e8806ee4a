//! Requirements on the confusion matrices (`RULE:tpr>=X`, `RULE:fpr<=X`, and on the
//! bounds of their 95% intervals, `RULE:tpr_lower>=X`, `RULE:fpr_upper<=X`): parsed from
//! the matrix's `requirements` or the command line, and judged. A requirement on a rate
//! that holds on the point estimate but not on the interval says it is unsupported. Messages name no flag: the
//! same text comes from a matrix file or a command line, and the caller says which.

use super::confusion::Confusion;
use crate::detector::RULES;
use serde::{Deserialize, Serialize};

/// What a rule must achieve over the whole validation: `RULE:METRIC OP VALUE`.
#[derive(Clone, Debug, PartialEq)]
pub struct Requirement {
    pub rule: String,
    pub metric: Metric,
    pub at_least: bool,
    pub value: f64,
    text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// True positives over virtual runs.
    Tpr,
    /// False positives over native runs.
    Fpr,
    /// The bounds of their exact 95% intervals.
    TprLower,
    TprUpper,
    FprLower,
    FprUpper,
}

impl Metric {
    /// Each metric by its spelling.
    const ALL: [(&'static str, Metric); 6] = [
        ("tpr_lower", Metric::TprLower),
        ("tpr_upper", Metric::TprUpper),
        ("fpr_lower", Metric::FprLower),
        ("fpr_upper", Metric::FprUpper),
        ("tpr", Metric::Tpr),
        ("fpr", Metric::Fpr),
    ];

    fn of_tpr(self) -> bool {
        matches!(self, Metric::Tpr | Metric::TprLower | Metric::TprUpper)
    }

    /// How a message names it.
    fn label(self) -> &'static str {
        match self {
            Metric::Tpr => "TPR",
            Metric::Fpr => "FPR",
            Metric::TprLower => "TPR's 95% lower bound",
            Metric::TprUpper => "TPR's 95% upper bound",
            Metric::FprLower => "FPR's 95% lower bound",
            Metric::FprUpper => "FPR's 95% upper bound",
        }
    }

    /// Its figure in `c`.
    fn of(self, c: &Confusion) -> Option<f64> {
        match self {
            Metric::Tpr => c.tpr,
            Metric::Fpr => c.fpr,
            Metric::TprLower => c.tpr_interval.map(|i| i.lower),
            Metric::TprUpper => c.tpr_interval.map(|i| i.upper),
            Metric::FprLower => c.fpr_interval.map(|i| i.lower),
            Metric::FprUpper => c.fpr_interval.map(|i| i.upper),
        }
    }
}

/// Why a requirement's text is not one; it names no flag or file: the caller does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequirementError {
    #[error("no `:` ({FORM})")]
    NoColon,
    #[error("unknown rule `{rule}` (rules: {known})")]
    UnknownRule { rule: String, known: String },
    #[error("unknown metric in `{condition}` ({FORM})")]
    UnknownMetric { condition: String },
    #[error("no >= or <= in `{condition}` ({FORM})")]
    NoComparison { condition: String },
    #[error("`{0}` is not a number")]
    NotANumber(String),
    #[error("a rate is between 0 and 1, not {0}")]
    NotARate(f64),
}

/// How a requirement is written, for the messages.
const FORM: &str = "write RULE:METRIC>=X or <=X, METRIC one of tpr, fpr, tpr_lower, tpr_upper, fpr_lower, fpr_upper (the bounds of the 95% interval), e.g. robust:tpr_lower>=0.95";

impl std::str::FromStr for Requirement {
    type Err = RequirementError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (rule, condition) = text.split_once(':').ok_or(RequirementError::NoColon)?;
        let (rule, condition) = (rule.trim(), condition.trim());
        if crate::detector::rule(rule).is_none() {
            let names: Vec<&str> = RULES.iter().map(|r| r.name).collect();
            return Err(RequirementError::UnknownRule {
                rule: rule.to_owned(),
                known: names.join(", "),
            });
        }
        let name_ends = condition.find(['>', '<', '=']).unwrap_or(condition.len());
        let (name, rest) = condition.split_at(name_ends);
        let Some(&(_, metric)) = Metric::ALL.iter().find(|(spelt, _)| *spelt == name.trim()) else {
            return Err(RequirementError::UnknownMetric {
                condition: condition.to_owned(),
            });
        };
        let rest = rest.trim_start();
        let (at_least, value) = if let Some(v) = rest.strip_prefix(">=") {
            (true, v)
        } else if let Some(v) = rest.strip_prefix("<=") {
            (false, v)
        } else {
            return Err(RequirementError::NoComparison {
                condition: condition.to_owned(),
            });
        };
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|_| RequirementError::NotANumber(value.trim().to_owned()))?;
        if !(0.0..=1.0).contains(&value) {
            return Err(RequirementError::NotARate(value));
        }
        Ok(Self {
            rule: rule.to_owned(),
            metric,
            at_least,
            value,
            text: text.to_owned(),
        })
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One requirement, judged.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequirementResult {
    pub requirement: String,
    pub met: bool,
    /// The figure it was judged on; absent when there was none to judge.
    pub actual: Option<f64>,
    pub why: String,
    /// A requirement on a rate met by the point estimate, where the 95% interval does not
    /// support it (too few runs): why, and how many runs would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsupported: Option<String>,
}

/// Judges each requirement on the report's confusion matrices. A rate that cannot be
/// measured (no native runs for an FPR: every host is itself a VM) does not pass.
///
/// `slice`: the report covers part of the matrix (a shard, a partial merge). There a rate
/// with no runs to judge is met vacuously, said in words, and every figure says it is the
/// slice's: the merge of every shard is what judges the matrix.
pub fn judge(
    requirements: &[Requirement],
    confusion: &std::collections::BTreeMap<String, Confusion>,
    slice: bool,
) -> Vec<RequirementResult> {
    requirements
        .iter()
        .map(|req| {
            let metric_name = req.metric.label();
            let judged = confusion.get(&req.rule);
            let actual = judged.and_then(|c| req.metric.of(c));
            let truth = if req.metric.of_tpr() {
                "virtual"
            } else {
                "native (bare-metal)"
            };
            let (met, why) = match actual {
                None if slice => (
                    true,
                    format!(
                        "{} has no {metric_name} in this slice of the matrix (no {truth} runs here): met vacuously; the merge of every shard judges the whole matrix",
                        req.rule
                    ),
                ),
                None => (
                    false,
                    format!("{} has no {metric_name} here: no {truth} runs were judged", req.rule),
                ),
                Some(actual) => {
                    let met = if req.at_least {
                        actual >= req.value
                    } else {
                        actual <= req.value
                    };
                    let op = if req.at_least { ">=" } else { "<=" };
                    (
                        met,
                        format!(
                            "{} {metric_name} {actual:.4} {} {op} {}{}",
                            req.rule,
                            if met { "holds" } else { "fails" },
                            req.value,
                            if slice { " (this slice of the matrix only)" } else { "" }
                        ),
                    )
                }
            };
            let unsupported = if met { judged.and_then(|c| unsupported(req, c)) } else { None };
            RequirementResult {
                requirement: req.to_string(),
                met,
                actual,
                why: match &unsupported {
                    Some(caveat) => format!("{why}; UNSUPPORTED: {caveat}"),
                    None => why,
                },
                unsupported,
            }
        })
        .collect()
}

/// Where a requirement on a rate's point estimate holds and its 95% interval crosses the
/// line: why the runs do not support it, and how many runs flagged alike would.
fn unsupported(req: &Requirement, c: &Confusion) -> Option<String> {
    let (interval, runs) = match req.metric {
        Metric::Tpr => (
            c.tpr_interval?,
            c.true_positive + c.false_negative + c.unsure_on_virtual,
        ),
        Metric::Fpr => (c.fpr_interval?, c.false_positive + c.true_negative + c.unsure_on_native),
        _ => return None,
    };
    let (bound, crosses, needed) = if req.at_least {
        (
            interval.lower,
            interval.lower < req.value,
            crate::stats::trials_to_support(req.value),
        )
    } else {
        (
            interval.upper,
            interval.upper > req.value,
            crate::stats::trials_to_support(1.0 - req.value),
        )
    };
    crosses.then(|| {
        // `>=` is supported by runs all flagged, `<=` by runs all unflagged.
        let needs = if needed == u64::MAX {
            "no finite number of runs can support it (an interval never reaches its end)".to_owned()
        } else {
            format!(
                "it takes at least {needed} runs, all {} alike, to support it",
                if req.at_least { "flagged" } else { "unflagged" }
            )
        };
        format!(
            "{runs} runs give a 95% interval of {interval} (exact), whose {} bound {bound:.4} is past {}; {needs}",
            if req.at_least { "lower" } else { "upper" },
            req.value,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::Verdict;

    #[test]
    fn requirements_parse_and_refuse_with_the_reason() {
        let r: Requirement = "robust:tpr>=0.99".parse().unwrap();
        assert_eq!(
            (r.rule.as_str(), r.metric, r.at_least, r.value),
            ("robust", Metric::Tpr, true, 0.99)
        );
        let r: Requirement = "payload:fpr<=0.01".parse().unwrap();
        assert_eq!((r.metric, r.at_least), (Metric::Fpr, false));
        let spaced: Requirement = "robust: tpr >= 0.99".parse().unwrap();
        assert_eq!((spaced.rule.as_str(), spaced.value), ("robust", 0.99));
        for (bad, why) in [
            ("robust", "no `:`"),
            ("nonsense:tpr>=0.5", "unknown rule"),
            ("robust:recall>=0.5", "unknown metric"),
            ("robust:tpr=0.5", "no >= or <="),
            ("robust:tpr>=lots", "not a number"),
            ("robust:tpr>=1.5", "between 0 and 1"),
        ] {
            let error = bad.parse::<Requirement>().unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    /// Every rule a run can be judged by can be required: each registered name, and each
    /// name a run with everything (counter ticks, the XOR loop, a payload verdict) gets.
    #[test]
    fn every_rule_evaluate_returns_is_requirable() {
        use crate::detector::{evaluate, Calibration, Evidence};
        use crate::results::{PayloadVerdictReport, ProbeSamples};
        let mut samples = ProbeSamples::new();
        for probe in guest_payload::Probe::ALL {
            samples.insert(probe, vec![300; 100]);
        }
        let payload = PayloadVerdictReport {
            verdict: guest_payload::PayloadVerdict::Virtual,
            score: 1.0,
            reason: "test".into(),
        };
        let evidence = Evidence {
            samples: &samples,
            ticks: &samples,
            counter_rate: Some((10_000, 1_000)),
            cpuid: &[],
            site_bytes: &[],
            tsc_khz: 2_000_000,
            cpuid_leaf: 0,
            payload: Some(&payload),
            patched_for_an_evader: None,
            clocks: None,
        };
        let judged = evaluate(&evidence, &Calibration::uncalibrated());
        let names = RULES.iter().map(|r| r.name).chain(judged.iter().map(|v| v.rule));
        for name in names {
            let text = format!("{name}:tpr>=0");
            let requirement: Requirement = text.parse().unwrap_or_else(|why| panic!("{text}: {why}"));
            assert_eq!(requirement.rule, name);
        }
        for name in ["vmaware-timer-2.7", "counter-tsc", "xor-rate", "cross-vcpu-tsc"] {
            assert!(judged.iter().any(|v| v.rule == name), "{name} is judged");
        }
    }

    #[test]
    fn requirements_are_judged_on_the_confusion_matrix() {
        let mut confusion = std::collections::BTreeMap::new();
        let mut robust = Confusion::default();
        robust.add(
            Verdict::Virtual,
            super::super::confusion::VerdictCounts {
                virtual_: 9,
                native: 1,
                unsure: 0,
            },
        );
        confusion.insert("robust".to_owned(), robust);
        let reqs: Vec<Requirement> = ["robust:tpr>=0.9", "robust:tpr>=0.95", "robust:fpr<=0.01"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let results = judge(&reqs, &confusion, false);
        assert!(results[0].met, "{:?}", results[0]);
        assert!(!results[1].met);
        assert!(
            results[1].why.contains("0.9000") && results[1].why.contains("fails"),
            "{}",
            results[1].why
        );
        assert!(!results[2].met, "no native runs: no FPR, no pass");
        assert!(results[2].why.contains("no FPR"), "{}", results[2].why);
    }

    /// A shard with no runs of a truth passes its gate vacuously, and says so; a figure it
    /// has is named as the slice's. The whole matrix never passes on nothing.
    #[test]
    fn a_slice_without_runs_passes_vacuously_in_words() {
        let confusion = std::collections::BTreeMap::new();
        let reqs: Vec<Requirement> = ["robust:tpr>=0.9"].iter().map(|r| r.parse().unwrap()).collect();
        let sliced = judge(&reqs, &confusion, true);
        assert!(sliced[0].met);
        assert!(sliced[0].why.contains("met vacuously"), "{}", sliced[0].why);
        let whole = judge(&reqs, &confusion, false);
        assert!(!whole[0].met);
    }

    /// The issue's own case: 6 runs, all flagged, "tpr>=0.99" holds on the point estimate
    /// and is called unsupported, naming the interval and the runs it would take; a
    /// requirement on the interval's bound fails on the same runs.
    #[test]
    fn a_rate_too_few_runs_support_is_called_unsupported_and_bounds_can_be_required() {
        let mut confusion = std::collections::BTreeMap::new();
        let mut robust = Confusion::default();
        robust.add(
            Verdict::Virtual,
            super::super::confusion::VerdictCounts {
                virtual_: 6,
                native: 0,
                unsure: 0,
            },
        );
        robust.add(
            Verdict::Native,
            super::super::confusion::VerdictCounts {
                virtual_: 0,
                native: 20,
                unsure: 0,
            },
        );
        confusion.insert("robust".to_owned(), robust);
        let reqs: Vec<Requirement> = [
            "robust:tpr>=0.99",
            "robust:tpr_lower>=0.99",
            "robust:tpr_lower>=0.5",
            "robust:fpr<=0.01",
            "robust:fpr_upper<=0.2",
            "robust:tpr>=0.5",
        ]
        .iter()
        .map(|r| r.parse().unwrap())
        .collect();
        let results = judge(&reqs, &confusion, false);
        let unsupported = results[0].unsupported.as_deref().unwrap();
        assert!(
            results[0].met && results[0].why.contains("UNSUPPORTED"),
            "{:?}",
            results[0]
        );
        assert!(
            unsupported.contains("6 runs") && unsupported.contains("[0.54, 1.00]") && unsupported.contains("368 runs"),
            "{unsupported}"
        );
        assert!(!results[1].met, "the lower bound, 0.54, is required: {:?}", results[1]);
        assert!(
            results[1].why.contains("TPR's 95% lower bound 0.5407 fails"),
            "{}",
            results[1].why
        );
        assert!(results[2].met && results[2].unsupported.is_none());
        // 0 of 20 natives flagged: FPR 0, but its upper bound is 0.17 > 0.01.
        let fpr = results[3].unsupported.as_deref().unwrap();
        assert!(
            results[3].met && fpr.contains("upper bound 0.1684") && fpr.contains("all unflagged"),
            "{fpr}"
        );
        // A rate of exactly 1 (or 0) is never supported by any finite number of runs.
        let all: Requirement = "robust:tpr>=1".parse().unwrap();
        let never = judge(&[all], &confusion, false);
        assert!(
            never[0]
                .unsupported
                .as_deref()
                .unwrap()
                .contains("no finite number of runs"),
            "{never:?}"
        );
        assert!(results[4].met, "{:?}", results[4]);
        assert!(results[5].met && results[5].unsupported.is_none(), "{:?}", results[5]);
        let error = "robust:tpr_middle>=0.5".parse::<Requirement>().unwrap_err().to_string();
        assert!(
            error.contains("unknown metric") && error.contains("tpr_lower"),
            "{error}"
        );
    }
}
