//! A rule's verdicts counted, and its confusion matrix: what requirements are judged on and
//! what the reports show. Below every other part of the validation.

use crate::detector::Verdict;
use crate::stats::{proportion_interval, Interval};
use serde::{Deserialize, Serialize};

/// Counts of one rule's verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCounts {
    pub virtual_: u32,
    pub native: u32,
    pub unsure: u32,
}

impl VerdictCounts {
    pub fn add(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Virtual => self.virtual_ += 1,
            Verdict::Native => self.native += 1,
            Verdict::Unsure => self.unsure += 1,
        }
    }

    pub fn total(&self) -> u32 {
        self.virtual_ + self.native + self.unsure
    }
}

/// A rule's confusion matrix.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Confusion {
    pub true_positive: u32,
    pub false_negative: u32,
    pub false_positive: u32,
    pub true_negative: u32,
    /// Unsure verdicts on virtual runs (counted as not flagged).
    pub unsure_on_virtual: u32,
    /// Unsure verdicts on native runs (counted as not flagged).
    pub unsure_on_native: u32,
    /// TP / virtual runs; `None` without virtual runs.
    pub tpr: Option<f64>,
    /// FP / native runs; `None` without native runs (as on a host that is itself a VM).
    pub fpr: Option<f64>,
    /// Their exact 95% intervals (`stats::proportion_interval`): what the runs support.
    #[serde(default)]
    pub tpr_interval: Option<Interval>,
    #[serde(default)]
    pub fpr_interval: Option<Interval>,
}

impl Confusion {
    pub fn add(&mut self, truth: Verdict, counts: VerdictCounts) {
        match truth {
            Verdict::Native => {
                self.false_positive += counts.virtual_;
                self.true_negative += counts.native;
                self.unsure_on_native += counts.unsure;
            }
            _ => {
                self.true_positive += counts.virtual_;
                self.false_negative += counts.native;
                self.unsure_on_virtual += counts.unsure;
            }
        }
        let positives = self.true_positive + self.false_negative + self.unsure_on_virtual;
        let negatives = self.false_positive + self.true_negative + self.unsure_on_native;
        self.tpr = (positives > 0).then(|| f64::from(self.true_positive) / f64::from(positives));
        self.fpr = (negatives > 0).then(|| f64::from(self.false_positive) / f64::from(negatives));
        self.tpr_interval = proportion_interval(self.true_positive, positives);
        self.fpr_interval = proportion_interval(self.false_positive, negatives);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_rates_count_unsure_as_not_flagged() {
        let mut c = Confusion::default();
        c.add(
            Verdict::Virtual,
            VerdictCounts {
                virtual_: 8,
                native: 1,
                unsure: 1,
            },
        );
        c.add(
            Verdict::Native,
            VerdictCounts {
                virtual_: 1,
                native: 3,
                unsure: 0,
            },
        );
        assert_eq!(
            (c.true_positive, c.false_negative, c.false_positive, c.true_negative),
            (8, 1, 1, 3)
        );
        assert_eq!(c.tpr, Some(0.8));
        assert_eq!(c.fpr, Some(0.25));
        let tpr = c.tpr_interval.unwrap();
        assert!(
            (tpr.lower - 0.4439).abs() < 1e-3 && (tpr.upper - 0.9748).abs() < 1e-3,
            "{tpr}"
        );
        assert!(c.fpr_interval.unwrap().upper > 0.8, "1 of 4 supports little");
        let mut only_virtual = Confusion::default();
        only_virtual.add(
            Verdict::Virtual,
            VerdictCounts {
                virtual_: 1,
                native: 0,
                unsure: 0,
            },
        );
        assert_eq!((only_virtual.fpr, only_virtual.fpr_interval), (None, None));
    }
}
