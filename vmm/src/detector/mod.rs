//! The detector: rules that look at one run and say virtual, native or unsure, with a score
//! and one line of why. Timing rules side by side with the non-timing signals:
//!
//! | rule | what it looks at | from |
//! |---|---|---|
//! | `seed-line` | (NOP, CPUID) medians against a dividing line | the seed article |
//! | `fixed-threshold` | integer mean of the first 10 unfenced `rdtsc; cpuid(0); rdtsc`, VM unless 0 < mean < 1000 | pafish v0.6, al-khaser v1.0.0 (faithful) |
//! | `tsc-lfence-ratio` | trimmed mean CPUID(0) over 8×LFENCE on the TSC, VM at 2.5 | in the spirit of VMAware `TIMER` |
//! | `robust` | low quantile and median of CPUID over the floor, in ns, vs native calibration | vmm |
//! | `hypervisor-bit` | CPUID.1:ECX[31] and the 0x40000000 vendor leaf | CPUID itself |
//! | `code-integrity` | the bytes of the guest's own CPUID sites | the patching traps' trace |
//! | `tsc-monotonic` | any sample whose TSC ran backwards | what a hider leaves behind |
//! | `vmaware-timer-2.7` | densest-cluster CPUID(0) / 8×LFENCE in counter ticks, VM at 3.5 | VMAware `TIMER` v2.7.0 (faithful; `clocks.rs`) |
//! | `vmaware-timer-main` | the same by interquartile mean, VM at 2.5, or a latency over 1000 / of 1 tick | VMAware `TIMER` main e6335799 |
//! | `counter-tsc` | counter time against TSC time over CPUID: the TSC lost time | vmm |
//! | `counter-stall` | the counter stood still over CPUID | vmm, after VMAware main's stall check |
//! | `cross-vcpu-tsc` | this vCPU's TSC behind the other's stamp | multi-core TSC checks |
//! | `xor-rate` | TSC cycles per dependent-XOR iteration, VM at ≤ 2 or ≥ 8 | VMAware e3f097fa (removed before v2.7.0) |
//!
//! A payload that reports its own verdict (SDK payloads, `VMM_CAP_VERDICT`) is judged
//! beside them as the rule `payload`.

pub mod calibration;
pub mod clocks;
pub mod rules;

use crate::results::ProbeSamples;
pub use calibration::Calibration;
use guest_payload::CpuidRecord;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Virtual,
    Native,
    Unsure,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Virtual => "virtual",
            Verdict::Native => "native",
            Verdict::Unsure => "unsure",
        }
    }
}

/// One rule's answer for one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleVerdict {
    pub rule: &'static str,
    pub verdict: Verdict,
    /// Higher means more virtual; each rule documents its scale.
    pub score: f64,
    /// 0..1: how far the evidence is from the rule's boundary, given its spread.
    pub confidence: f64,
    pub why: String,
}

/// What the rules see of a run.
#[derive(Clone, Copy, Debug)]
pub struct Evidence<'a> {
    pub samples: &'a ProbeSamples,
    /// Counter ticks over each sample (runs with a counter vCPU; empty otherwise).
    pub ticks: &'a ProbeSamples,
    /// TSC cycles and counter ticks over the run's rate window, where it had one.
    pub counter_rate: Option<(u64, u64)>,
    pub cpuid: &'a [CpuidRecord],
    pub site_bytes: &'a [[u8; 2]],
    pub tsc_khz: u32,
    pub cpuid_leaf: u32,
    /// The payload's own verdict, where it reported one.
    pub payload: Option<&'a crate::results::PayloadVerdictReport>,
}

/// The name under which a payload's own verdict is reported and scored.
pub const PAYLOAD_RULE: &str = "payload";

/// The rules of a set of runs, in report order: the built-in ones, those that look past
/// one TSC where any run had what they read, then `payload` where any run reported its
/// own verdict.
pub fn rule_columns<'a>(verdicts: impl IntoIterator<Item = &'a str>) -> Vec<&'static str> {
    let seen: std::collections::BTreeSet<&str> = verdicts.into_iter().collect();
    let mut columns = RULES.to_vec();
    for rule in clocks::COUNTER_RULES
        .into_iter()
        .chain([clocks::XOR_RULE, PAYLOAD_RULE])
    {
        if seen.contains(rule) {
            columns.push(rule);
        }
    }
    columns
}

/// Every rule's names, in the order they are reported.
pub const RULES: [&str; 7] = [
    "seed-line",
    "fixed-threshold",
    "tsc-lfence-ratio",
    "robust",
    "hypervisor-bit",
    "code-integrity",
    "tsc-monotonic",
];

/// Applies every rule to one run.
pub fn evaluate(evidence: &Evidence, calibration: &Calibration) -> Vec<RuleVerdict> {
    [
        rules::seed_line(evidence, calibration),
        rules::fixed_threshold(evidence),
        rules::tsc_lfence_ratio(evidence),
        rules::robust(evidence, calibration),
        rules::hypervisor_bit(evidence),
        rules::code_integrity(evidence),
        rules::tsc_monotonic(evidence),
    ]
    .into_iter()
    .chain(clocks::evaluate(evidence))
    .chain(evidence.payload.map(payload_verdict))
    .collect()
}

/// The payload's verdict as a rule's: its own score, full confidence in its own word.
fn payload_verdict(report: &crate::results::PayloadVerdictReport) -> RuleVerdict {
    use guest_payload::PayloadVerdict;
    let verdict = match report.verdict {
        PayloadVerdict::Virtual => Verdict::Virtual,
        PayloadVerdict::Native => Verdict::Native,
        PayloadVerdict::Unsure | PayloadVerdict::None => Verdict::Unsure,
    };
    RuleVerdict {
        rule: PAYLOAD_RULE,
        verdict,
        score: if report.score.is_finite() { report.score } else { 0.0 },
        confidence: 1.0,
        why: format!("the payload says: {}", report.reason),
    }
}
