//! What a validation measured: every run kept as a [`RunRecord`] (its cell, repeat, host,
//! truth, each rule's verdict and a sketch of its CPUID cost), with the hosts, refusals and
//! failures. Everything else — per-cell results, confusion matrices, requirements, tables,
//! plots — is derived from these records, the same way for one `validate` and for `vmm
//! merge` of many.

use super::matrix::{MatrixConfig, Shard};
use crate::detector::{RuleVerdict, Verdict};
use crate::host::{HostInfo, KvmFlavour};
use guest_payload::{Cycles, Probe};
use serde::{Deserialize, Serialize};

/// Order statistics kept per run for histograms (evenly spaced, 0.5% apart).
pub const SKETCH_POINTS: usize = 200;

/// A host as a validation groups runs by: the parts of its [`HostInfo`] that make two
/// hosts' figures differ, in the flat shape validation reports have always had.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct HostIdentity {
    pub cpu_model: String,
    pub microcode: Option<String>,
    pub kernel: Option<String>,
    pub kvm: KvmFlavour,
    pub kvm_module: Option<String>,
    /// The host is itself a VM (CPUID.1:ECX[31]): a cloud CI runner, for one. Its figures
    /// are nested figures, and its native runs are virtual ground truth.
    #[serde(rename = "nested")]
    pub host_is_vm: bool,
    pub tsc_khz: u32,
    /// The detector was calibrated on this host.
    pub calibrated: bool,
}

impl HostIdentity {
    pub fn new(host: &HostInfo, calibrated: bool) -> Self {
        Self {
            cpu_model: host.cpu_model.clone(),
            microcode: host.microcode.clone(),
            kernel: host.kernel.clone(),
            kvm: host.kvm.flavour,
            kvm_module: host.kvm.module.clone(),
            host_is_vm: host.host_is_vm,
            tsc_khz: host.tsc_khz,
            calibrated,
        }
    }

    /// One line naming the host.
    pub fn label(&self) -> String {
        format!(
            "{} | microcode {} | kernel {} | KVM {}{} | {}",
            self.cpu_model,
            self.microcode.as_deref().unwrap_or("?"),
            self.kernel.as_deref().unwrap_or("?"),
            self.kvm.name(),
            self.kvm_module.as_deref().map_or(String::new(), |m| format!(" ({m})")),
            if self.host_is_vm {
                "nested (the host is a VM)"
            } else {
                "bare metal"
            }
        )
    }
}

/// A host of a validation, and the shards of the matrix it ran.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostRecord {
    #[serde(flatten)]
    pub identity: HostIdentity,
    pub shards: Vec<Shard>,
}

/// One rule's verdict on one run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunVerdict {
    pub rule: String,
    pub verdict: Verdict,
    pub score: f64,
    /// The rule's one line of why: the evidence behind the verdict (older reports: empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
}

/// One run of the matrix.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// Index into the report's `matrix_cells`.
    pub cell: usize,
    pub repeat: u32,
    /// Index into the report's `hosts`.
    pub host: usize,
    pub truth: Verdict,
    pub verdicts: Vec<RunVerdict>,
    pub cpuid_median: Option<Cycles>,
    pub nop_median: Option<Cycles>,
    pub floor_median: Option<Cycles>,
    pub lfence8_median: Option<Cycles>,
    pub tsc_khz: u32,
    /// The CPUID probe's samples as [`SKETCH_POINTS`] evenly spaced order statistics (all
    /// of them when fewer): what histograms are drawn from, in bounded memory.
    pub cpuid_sketch: Vec<Cycles>,
    /// The same of every other probe the run took, by name: what each cell's distance to
    /// native is measured on.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub probe_sketches: std::collections::BTreeMap<String, Vec<Cycles>>,
}

impl RunRecord {
    pub fn new(
        (cell, repeat, host): (usize, u32, usize),
        truth: Verdict,
        verdicts: &[RuleVerdict],
        samples: &crate::results::ProbeSamples,
        tsc_khz: u32,
    ) -> Self {
        let median = |p: Probe| {
            samples
                .get(&p)
                .filter(|s| !s.is_empty())
                .map(|s| crate::stats::median(s))
        };
        Self {
            cell,
            repeat,
            host,
            truth,
            verdicts: verdicts
                .iter()
                .map(|v| RunVerdict {
                    rule: v.rule.to_owned(),
                    verdict: v.verdict,
                    score: if v.score.is_finite() { v.score } else { 0.0 },
                    why: v.why.clone(),
                })
                .collect(),
            cpuid_median: median(Probe::Cpuid),
            nop_median: median(Probe::Nop),
            floor_median: median(Probe::Rdtsc),
            lfence8_median: median(Probe::Lfence8),
            tsc_khz,
            cpuid_sketch: sketch(samples.get(&Probe::Cpuid).map_or(&[], Vec::as_slice)),
            probe_sketches: samples
                .iter()
                .filter(|(probe, values)| **probe != Probe::Cpuid && !values.is_empty())
                .map(|(probe, values)| (probe.name().to_owned(), sketch(values)))
                .collect(),
        }
    }

    /// The sketch of the probe named `probe`, empty where the run did not take it.
    pub fn sketch_of(&self, probe: &str) -> &[Cycles] {
        if probe == Probe::Cpuid.name() {
            return &self.cpuid_sketch;
        }
        self.probe_sketches.get(probe).map_or(&[], Vec::as_slice)
    }
}

/// [`SKETCH_POINTS`] evenly spaced order statistics of `samples` (every sample when fewer).
pub fn sketch(samples: &[Cycles]) -> Vec<Cycles> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    if sorted.len() <= SKETCH_POINTS {
        return sorted;
    }
    let n = sorted.len();
    (0..SKETCH_POINTS)
        .map(|i| sorted[(2 * i + 1) * n / (2 * SKETCH_POINTS)])
        .collect()
}

/// A cell a host could not run (a capability it lacks), for `jobs` of its repeats.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Refusal {
    pub cell: usize,
    pub host: usize,
    pub jobs: u32,
    pub why: String,
}

/// A cell whose runs stopped at the precision asked (`--precision`): its remaining
/// `jobs` on this host were not run, and need not be; or (`reached` false) every job ran
/// and the precision was not reached, which the report says.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Stop {
    pub cell: usize,
    pub host: usize,
    /// The shard whose runs stopped: the jobs it leaves are that shard's alone.
    pub shard: Shard,
    /// Jobs of this host's shards left unrun.
    pub jobs: u32,
    /// Runs the cell took on this host.
    pub runs: u32,
    pub reached: bool,
    pub why: String,
}

/// A run that failed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub cell: usize,
    pub repeat: u32,
    pub host: usize,
    pub why: String,
}

/// A cell of the matrix, as reports name it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CellSpec {
    pub mode: String,
    pub shaping: String,
    pub busy: u16,
    /// `none`, or the evasions joined with `+`.
    #[serde(default = "no_evasion")]
    pub evasion: String,
    /// The cell stages a real host (a root-partition profile): its truth is native.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truth_host: bool,
}

pub(crate) fn no_evasion() -> String {
    "none".into()
}

impl CellSpec {
    /// What the cell stages against the detectors: its shaping and its evasions.
    pub fn arms(&self) -> String {
        match self.evasion.as_str() {
            "none" => self.shaping.clone(),
            evasion if self.shaping == "none" => evasion.to_string(),
            evasion => format!("{}+{evasion}", self.shaping),
        }
    }
}

/// What a validation measured: the part of a report that `vmm merge` reads and adds up.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidationInputs {
    pub schema_version: u32,
    /// The matrix file it was run from.
    pub config: String,
    pub matrix: MatrixConfig,
    /// The payload every cell ran, and a digest of its bytes.
    pub payload: String,
    pub payload_digest: String,
    pub matrix_cells: Vec<CellSpec>,
    /// Each host, with the shards it ran (`1/1`: the whole matrix).
    pub hosts: Vec<HostRecord>,
    pub runs: Vec<RunRecord>,
    pub refusals: Vec<Refusal>,
    pub failures: Vec<Failure>,
    /// Attempts that failed and were retried in a fresh VM (the retry is in `runs`, or in
    /// `failures` where it failed too): reported, never silently dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retried: Vec<Failure>,
    /// Cells stopped at the precision asked, or run to the bound without reaching it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stops: Vec<Stop>,
    /// Set when a signal stopped the validation early: the report holds what finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_by: Option<i32>,
}

impl ValidationInputs {
    /// The report's description of what it ran (matrix, cells, payload), without records.
    pub fn clone_header(&self) -> Self {
        Self {
            schema_version: self.schema_version,
            config: self.config.clone(),
            matrix: self.matrix.clone(),
            payload: self.payload.clone(),
            payload_digest: self.payload_digest.clone(),
            matrix_cells: self.matrix_cells.clone(),
            hosts: self.hosts.clone(),
            runs: Vec::new(),
            refusals: Vec::new(),
            failures: Vec::new(),
            retried: Vec::new(),
            stops: Vec::new(),
            interrupted: self.interrupted.clone(),
            interrupted_by: self.interrupted_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketches_keep_evenly_spaced_order_statistics() {
        let samples: Vec<Cycles> = (0..10_000).rev().collect();
        let s = sketch(&samples);
        assert_eq!(s.len(), SKETCH_POINTS);
        assert_eq!(s[0], 25, "the 0.25th percentile");
        assert_eq!(s[SKETCH_POINTS - 1], 9975);
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(sketch(&[3, 1, 2]), vec![1, 2, 3], "few samples are kept whole");
    }
}
