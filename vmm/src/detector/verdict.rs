//! What a rule says of a run, and what it looks at: the types every rule shares.

use crate::results::ProbeSamples;
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
    /// Where the testbed patched the guest's code to stage an evader whose original
    /// patches nothing: why (`RunSpec::patched_for_an_evader`).
    pub patched_for_an_evader: Option<&'static str>,
    /// The clocks the run read besides the TSC, where it read any.
    pub clocks: Option<crate::results::ClockRecord>,
}
