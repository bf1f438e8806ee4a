//! A validation's report. Every run is kept as a [`RunRecord`] (its cell, repeat, host,
//! truth, each rule's verdict and a sketch of its CPUID cost), so that everything else —
//! per-cell results, confusion matrices, the per-host table, requirements, plots — is
//! derived from the records, the same way for one `validate` and for `vmm merge` of many.

use super::gate::{self, Requirement, RequirementResult};
use super::matrix::{ground_truth, MatrixConfig, Shard};
use crate::detector::{rule_columns, RuleVerdict, Verdict};
use crate::escape::{markdown as md, terminal as t};
use crate::host::{HostInfo, KvmFlavour};
use crate::modes::Path as CpuidPath;
use crate::report::plot::PlotRun;
use guest_payload::{Cycles, Probe};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

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
}

impl RunRecord {
    pub fn new(
        (cell, repeat, host): (usize, u32, usize),
        truth: Verdict,
        verdicts: &[RuleVerdict],
        samples: &crate::vm::ProbeSamples,
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
                })
                .collect(),
            cpuid_median: median(Probe::Cpuid),
            nop_median: median(Probe::Nop),
            floor_median: median(Probe::Rdtsc),
            lfence8_median: median(Probe::Lfence8),
            tsc_khz,
            cpuid_sketch: sketch(samples.get(&Probe::Cpuid).map_or(&[], Vec::as_slice)),
        }
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

fn no_evasion() -> String {
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
            interrupted: self.interrupted.clone(),
            interrupted_by: self.interrupted_by,
        }
    }
}

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

/// One rule over one cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellRule {
    pub counts: VerdictCounts,
    /// Share of runs flagged virtual: the TPR for a virtual cell, the FPR for a native one.
    pub flagged_rate: f64,
    pub score_min: f64,
    pub score_median: f64,
    pub score_max: f64,
}

/// One cell's outcome (per ground truth: a native cell is native on bare-metal hosts and
/// virtual on nested ones, and a merge of both shows two rows).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    pub mode: String,
    pub shaping: String,
    pub busy: u16,
    #[serde(default = "no_evasion")]
    pub evasion: String,
    pub truth: Verdict,
    pub runs: u32,
    /// Why no host could run the cell (e.g. TSC moves not honoured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Runs that failed (the others are kept: nothing measured is lost).
    pub failed_runs: u32,
    pub rules: BTreeMap<String, CellRule>,
    /// Median of the runs' CPUID and NOP medians.
    pub cpuid_median: Option<Cycles>,
    pub nop_median: Option<Cycles>,
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
    }
}

/// How much of its share of the matrix a host ran.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostCoverage {
    pub host: usize,
    /// The jobs (cell × repeat) of the shards this host ran.
    pub jobs: u64,
    pub ran: u64,
    pub refused: u64,
    pub failed: u64,
    /// Jobs of those shards with no record: a shard missing from a merge, or interrupted.
    pub missing: u64,
}

/// How much of the matrix the report covers, all hosts together: every job (cell ×
/// repeat) ran, failed or was refused somewhere, or it is missing — a shard not given.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MatrixCoverage {
    pub jobs: u64,
    pub covered: u64,
    pub missing: u64,
    /// Shards no host ran, e.g. `2/3` (the first thousand).
    pub missing_shards: Vec<String>,
    /// How many shards no host ran, all of them.
    #[serde(default)]
    pub missing_shard_count: u64,
}

impl MatrixCoverage {
    /// The shards not given, for a line of text: the first 20, then how many more.
    pub fn missing_shards_text(&self) -> String {
        const SHOWN: usize = 20;
        let mut text = self
            .missing_shards
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let all = self.missing_shard_count.max(self.missing_shards.len() as u64);
        if all > SHOWN as u64 {
            text += &format!(" and {} more", all - SHOWN as u64);
        }
        text
    }
}

/// One host's confusion matrices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostConfusion {
    pub host: usize,
    pub label: String,
    pub confusion: BTreeMap<String, Confusion>,
}

/// The whole validation: what was measured, and everything derived from it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidationReport {
    #[serde(flatten)]
    pub inputs: ValidationInputs,
    pub description: String,
    pub matrix_coverage: MatrixCoverage,
    pub coverage: Vec<HostCoverage>,
    /// Per cell (and truth): counts, rates and medians.
    pub cells: Vec<CellResult>,
    /// Per rule, over every run of every host.
    pub confusion: BTreeMap<String, Confusion>,
    pub per_host: Vec<HostConfusion>,
    /// Detector × evasion: which of what the cells stage each rule sees through.
    pub arms_race: ArmsRace,
    pub requirements: Vec<RequirementResult>,
}

/// What a group of cells stages against the detectors (shaping and evasions, every path
/// and busyness together), and what those runs truly are.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArmsColumn {
    pub arms: String,
    pub truth: Verdict,
    pub runs: u32,
}

/// Per rule and column, the share of the column's runs the rule flagged virtual: on a
/// virtual column, how often it sees through (TPR); on a native one (a real host, a
/// root partition), how often it cries wolf (FPR).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ArmsRace {
    pub columns: Vec<ArmsColumn>,
    pub rules: BTreeMap<String, Vec<Option<f64>>>,
}

fn arms_race(inputs: &ValidationInputs) -> ArmsRace {
    let mut columns: Vec<ArmsColumn> = Vec::new();
    let mut column_of: std::collections::HashMap<(String, Verdict), usize> = std::collections::HashMap::new();
    let mut flagged: BTreeMap<String, BTreeMap<usize, (u32, u32)>> = BTreeMap::new();
    for run in &inputs.runs {
        let Some(cell) = inputs.matrix_cells.get(run.cell) else {
            continue;
        };
        let arms = cell.arms();
        let column = *column_of.entry((arms.clone(), run.truth)).or_insert_with(|| {
            columns.push(ArmsColumn {
                arms,
                truth: run.truth,
                runs: 0,
            });
            columns.len() - 1
        });
        columns[column].runs += 1;
        for v in &run.verdicts {
            let entry = flagged.entry(v.rule.clone()).or_default().entry(column).or_default();
            entry.0 += u32::from(v.verdict == Verdict::Virtual);
            entry.1 += 1;
        }
    }
    let rules = flagged
        .into_iter()
        .map(|(rule, by_column)| {
            let rates = (0..columns.len())
                .map(|c| by_column.get(&c).map(|&(v, n)| f64::from(v) / f64::from(n.max(1))))
                .collect();
            (rule, rates)
        })
        .collect();
    ArmsRace { columns, rules }
}

fn arms_race_table(out: &mut String, report: &ValidationReport, rules: &[&'static str]) {
    let race = &report.arms_race;
    if race.columns.len() < 2 {
        return;
    }
    let _ = writeln!(
        out,
        "
detector × what the cells stage: share flagged virtual (sees: caught a VM; fooled: called a VM native or unsure; false+: called a host a VM):"
    );
    let _ = write!(out, "{:<19}", "rule");
    for column in &race.columns {
        let _ = write!(out, " {:>22}", format!("{} [{}]", t(&column.arms), column.truth.name()));
    }
    let _ = writeln!(out);
    for rule in rules {
        let Some(rates) = race.rules.get(*rule) else { continue };
        let _ = write!(out, "{rule:<19}");
        for (column, rate) in race.columns.iter().zip(rates) {
            let text = match (rate, column.truth) {
                (None, _) => "-".to_string(),
                (Some(r), Verdict::Virtual) => format!("{r:.2} {}", if *r >= 0.5 { "sees" } else { "fooled" }),
                (Some(r), _) => format!("{r:.2} {}", if *r >= 0.5 { "false+" } else { "ok" }),
            };
            let _ = write!(out, " {text:>22}");
        }
        let _ = writeln!(out);
    }
}

impl ValidationReport {
    /// Derives everything from the records, and judges the requirements (the matrix's own
    /// and `extra`).
    pub fn assemble(inputs: ValidationInputs, extra: &[Requirement]) -> Self {
        let cells = cell_results(&inputs);
        let confusion = confusion_of(inputs.runs.iter());
        let mut runs_of_host: Vec<Vec<&RunRecord>> = vec![Vec::new(); inputs.hosts.len()];
        for run in &inputs.runs {
            if let Some(runs) = runs_of_host.get_mut(run.host) {
                runs.push(run);
            }
        }
        let per_host = runs_of_host
            .into_iter()
            .enumerate()
            .map(|(host, runs)| HostConfusion {
                host,
                label: inputs.hosts[host].identity.label(),
                confusion: confusion_of(runs.into_iter()),
            })
            .collect();
        let coverage = coverage(&inputs);
        let matrix_coverage = matrix_coverage(&inputs);
        let arms_race = arms_race(&inputs);
        let mut unparsed = Vec::new();
        let mut parsed = Vec::new();
        for text in &inputs.matrix.requirements {
            match text.parse::<Requirement>() {
                Ok(requirement) => parsed.push(requirement),
                // A stored requirement this vmm cannot read is unmet, in words, not dropped.
                Err(why) => unparsed.push(RequirementResult {
                    requirement: text.clone(),
                    met: false,
                    actual: None,
                    why: format!("`{text}` cannot be judged: {why}"),
                }),
            }
        }
        parsed.extend(
            extra
                .iter()
                .filter(|r| !parsed.contains(r))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let mut requirements = gate::judge(&parsed, &confusion, matrix_coverage.missing > 0);
        requirements.extend(unparsed);
        Self {
            description: inputs.matrix.description.clone(),
            matrix_coverage,
            coverage,
            cells,
            confusion,
            per_host,
            arms_race,
            requirements,
            inputs,
        }
    }

    /// The runs as the plot draws them.
    pub fn plot_runs(&self) -> Vec<PlotRun> {
        self.inputs
            .runs
            .iter()
            .filter_map(|run| {
                let label = self.inputs.matrix_cells.get(run.cell)?.mode.clone();
                let nop = run.nop_median.unwrap_or(1);
                Some(PlotRun {
                    label,
                    nop_median: nop,
                    cpuid_median: run.cpuid_median?,
                    floor_median: run.floor_median.unwrap_or(nop),
                    lfence8_median: run.lfence8_median,
                    cpuid: run.cpuid_sketch.clone(),
                    tsc_khz: run.tsc_khz,
                })
            })
            .collect()
    }

    pub fn unmet_requirements(&self) -> Vec<&RequirementResult> {
        self.requirements.iter().filter(|r| !r.met).collect()
    }
}

fn confusion_of<'a>(runs: impl Iterator<Item = &'a RunRecord>) -> BTreeMap<String, Confusion> {
    let mut confusion: BTreeMap<String, Confusion> = crate::detector::every_run_rules()
        .map(|r| (r.to_owned(), Confusion::default()))
        .collect();
    for run in runs {
        for v in &run.verdicts {
            let mut one = VerdictCounts::default();
            one.add(v.verdict);
            confusion.entry(v.rule.clone()).or_default().add(run.truth, one);
        }
    }
    confusion
}

fn cell_truth(spec: &CellSpec, host: Option<&HostRecord>) -> Verdict {
    if spec.truth_host {
        return Verdict::Native;
    }
    let mode = spec
        .mode
        .parse::<CpuidPath>()
        .map_or(crate::modes::Mode::HwAssist, CpuidPath::mode);
    ground_truth(mode, host.is_none_or(|h| h.identity.host_is_vm))
}

fn cell_results(inputs: &ValidationInputs) -> Vec<CellResult> {
    let cells = inputs.matrix_cells.len();
    // Records grouped by cell in one pass each: linear in runs, not cells × runs.
    let mut runs_of_cell: Vec<Vec<&RunRecord>> = vec![Vec::new(); cells];
    for run in &inputs.runs {
        if let Some(runs) = runs_of_cell.get_mut(run.cell) {
            runs.push(run);
        }
    }
    let mut failed_of_cell = vec![0u32; cells];
    for failure in &inputs.failures {
        if let Some(failed) = failed_of_cell.get_mut(failure.cell) {
            *failed += 1;
        }
    }
    let mut refusal_of_cell: Vec<Option<&Refusal>> = vec![None; cells];
    for refusal in &inputs.refusals {
        if let Some(slot @ None) = refusal_of_cell.get_mut(refusal.cell) {
            *slot = Some(refusal);
        }
    }
    let mut results = Vec::new();
    for (index, spec) in inputs.matrix_cells.iter().enumerate() {
        let mut by_truth: BTreeMap<Verdict, Vec<&RunRecord>> = BTreeMap::new();
        for &run in &runs_of_cell[index] {
            by_truth.entry(run.truth).or_default().push(run);
        }
        let failed_runs = failed_of_cell[index];
        if by_truth.is_empty() {
            let refusal = refusal_of_cell[index];
            let host = refusal.map_or(0, |r| r.host);
            let truth = cell_truth(spec, inputs.hosts.get(host));
            results.push(CellResult {
                mode: spec.mode.clone(),
                shaping: spec.shaping.clone(),
                busy: spec.busy,
                evasion: spec.evasion.clone(),
                truth,
                runs: 0,
                refused: refusal.map(|r| r.why.clone()),
                failed_runs,
                rules: BTreeMap::new(),
                cpuid_median: None,
                nop_median: None,
            });
            continue;
        }
        // Failed runs are told once per cell, on its first row.
        for (row, (truth, runs)) in by_truth.into_iter().enumerate() {
            results.push(cell_result(spec, truth, &runs, if row == 0 { failed_runs } else { 0 }));
        }
    }
    results
}

fn cell_result(spec: &CellSpec, truth: Verdict, runs: &[&RunRecord], failed_runs: u32) -> CellResult {
    let mut verdicts: BTreeMap<String, (VerdictCounts, Vec<f64>)> = BTreeMap::new();
    for run in runs {
        for v in &run.verdicts {
            let entry = verdicts.entry(v.rule.clone()).or_default();
            entry.0.add(v.verdict);
            entry.1.push(v.score);
        }
    }
    let rules = verdicts
        .into_iter()
        .map(|(rule, (counts, mut scores))| {
            scores.sort_by(f64::total_cmp);
            let at = |i: usize| scores.get(i).copied().unwrap_or(0.0);
            let cell_rule = CellRule {
                counts,
                flagged_rate: f64::from(counts.virtual_) / f64::from(counts.total().max(1)),
                score_min: at(0),
                score_median: at(scores.len().saturating_sub(1) / 2),
                score_max: at(scores.len().saturating_sub(1)),
            };
            (rule, cell_rule)
        })
        .collect();
    let median = |values: Vec<Cycles>| (!values.is_empty()).then(|| crate::stats::median(&values));
    CellResult {
        mode: spec.mode.clone(),
        shaping: spec.shaping.clone(),
        busy: spec.busy,
        evasion: spec.evasion.clone(),
        truth,
        runs: runs.len() as u32,
        refused: None,
        failed_runs,
        rules,
        cpuid_median: median(runs.iter().filter_map(|r| r.cpuid_median).collect()),
        nop_median: median(runs.iter().filter_map(|r| r.nop_median).collect()),
    }
}

/// Jobs of `shards` (cells × repeats, numbered cell by cell): counted, not enumerated,
/// for the shards of one partition (as `merge::check` requires of every host).
fn jobs_in(shards: &[Shard], cells: usize, repeats: u32) -> u64 {
    let total = cells as u64 * u64::from(repeats);
    match super::merge::HostJobs::new(shards) {
        Ok(jobs) => jobs.jobs(total),
        Err(_) => (0..total).filter(|&job| shards.iter().any(|s| s.takes(job))).count() as u64,
    }
}

/// The most missing shards a report names (the count says how many there are in all).
const MISSING_SHARDS_LISTED: usize = 1000;

fn matrix_coverage(inputs: &ValidationInputs) -> MatrixCoverage {
    let repeats = inputs.matrix.repeats;
    let cells = inputs.matrix_cells.len();
    let job = |cell: usize, repeat: u32| cell as u64 * u64::from(repeats) + u64::from(repeat);
    let mut covered: std::collections::HashSet<u64> = inputs.runs.iter().map(|r| job(r.cell, r.repeat)).collect();
    covered.extend(inputs.failures.iter().map(|f| job(f.cell, f.repeat)));
    let taken: Vec<Option<super::merge::HostJobs>> = inputs
        .hosts
        .iter()
        .map(|h| super::merge::HostJobs::new(&h.shards).ok())
        .collect();
    for refusal in &inputs.refusals {
        let shards = inputs.hosts.get(refusal.host).map_or(&[][..], |h| h.shards.as_slice());
        let host = taken.get(refusal.host).and_then(Option::as_ref);
        covered.extend((0..repeats).map(|r| job(refusal.cell, r)).filter(|&j| match host {
            Some(host) => host.takes(j),
            None => shards.iter().any(|s| s.takes(j)),
        }));
    }
    let jobs = cells as u64 * u64::from(repeats);
    // Shards given, by count: missing ones found in time linear in those given.
    let mut given: BTreeMap<u32, std::collections::HashSet<u32>> = BTreeMap::new();
    for shard in inputs.hosts.iter().flat_map(|h| &h.shards) {
        given.entry(shard.count).or_default().insert(shard.index);
    }
    let mut missing_shards = Vec::new();
    let mut missing_shard_count = 0u64;
    for (count, indices) in given {
        let missing = u64::from(count).saturating_sub(indices.len() as u64);
        missing_shard_count += missing;
        let mut named = 0u64;
        let mut index = 1;
        while named < missing && missing_shards.len() < MISSING_SHARDS_LISTED && index <= count {
            if !indices.contains(&index) {
                missing_shards.push(format!("{index}/{count}"));
                named += 1;
            }
            index += 1;
        }
    }
    let covered = covered.len() as u64;
    MatrixCoverage {
        jobs,
        covered,
        missing: jobs.saturating_sub(covered),
        missing_shards,
        missing_shard_count,
    }
}

fn coverage(inputs: &ValidationInputs) -> Vec<HostCoverage> {
    // One pass over each kind of record: linear in records and hosts.
    let hosts = inputs.hosts.len();
    let (mut ran, mut refused, mut failed) = (vec![0u64; hosts], vec![0u64; hosts], vec![0u64; hosts]);
    for run in &inputs.runs {
        if let Some(n) = ran.get_mut(run.host) {
            *n += 1;
        }
    }
    for refusal in &inputs.refusals {
        if let Some(n) = refused.get_mut(refusal.host) {
            *n += u64::from(refusal.jobs);
        }
    }
    for failure in &inputs.failures {
        if let Some(n) = failed.get_mut(failure.host) {
            *n += 1;
        }
    }
    (0..hosts)
        .map(|host| {
            let jobs = jobs_in(
                &inputs.hosts[host].shards,
                inputs.matrix_cells.len(),
                inputs.matrix.repeats,
            );
            let (ran, refused, failed) = (ran[host], refused[host], failed[host]);
            HostCoverage {
                host,
                jobs,
                ran,
                refused,
                failed,
                missing: jobs.saturating_sub(ran + refused + failed),
            }
        })
        .collect()
}

fn shard_list(shards: &[Shard]) -> String {
    shards.iter().map(Shard::to_string).collect::<Vec<_>>().join(", ")
}

/// TP, FN, FP, TN, unsure on virtual, unsure on native, TPR, FPR: one rule's row.
fn confusion_row(c: &Confusion) -> [String; 8] {
    [
        c.true_positive.to_string(),
        c.false_negative.to_string(),
        c.false_positive.to_string(),
        c.true_negative.to_string(),
        c.unsure_on_virtual.to_string(),
        c.unsure_on_native.to_string(),
        rate(c.tpr),
        rate(c.fpr),
    ]
}

fn rate(rate: Option<f64>) -> String {
    rate.map_or("—".into(), |r| format!("{:.2}", r))
}

/// The rules present, in report order.
fn columns(report: &ValidationReport) -> Vec<&'static str> {
    rule_columns(report.confusion.keys().map(String::as_str))
}

fn truth_note(report: &ValidationReport) -> String {
    let nested = report.inputs.hosts.iter().filter(|h| h.identity.host_is_vm).count();
    match (nested, report.inputs.hosts.len()) {
        (0, _) => "native cells are native ground truth: the hosts run on bare metal".into(),
        (n, all) if n == all => "native cells are labelled virtual: every host is itself a VM (CPUID.1:ECX[31]), so its native runs are virtualised".into(),
        _ => "native cells are native on bare-metal hosts and virtual on hosts that are themselves VMs (a row each)".into(),
    }
}

fn matrix_coverage_line(report: &ValidationReport) -> String {
    let c = &report.matrix_coverage;
    if c.missing == 0 {
        format!("matrix: all {} jobs (cell × repeat) covered — complete", c.jobs)
    } else {
        format!(
            "matrix: PARTIAL — {} of {} jobs covered, {} missing{}",
            c.covered,
            c.jobs,
            c.missing,
            if c.missing_shards.is_empty() {
                String::new()
            } else {
                format!(" (shards not given: {})", c.missing_shards_text())
            }
        )
    }
}

fn coverage_lines(report: &ValidationReport) -> Vec<String> {
    report
        .coverage
        .iter()
        .map(|c| {
            let state = if c.missing == 0 {
                "complete".to_owned()
            } else {
                format!("PARTIAL: {} jobs missing", c.missing)
            };
            format!(
                "host {}: {} of {} jobs ran, {} refused, {} failed — {state}",
                c.host, c.ran, c.jobs, c.refused, c.failed
            )
        })
        .collect()
}

fn confusion_table(out: &mut String, confusion: &BTreeMap<String, Confusion>) {
    let _ = writeln!(
        out,
        "{:<19} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>6}",
        "rule", "TP", "FN", "FP", "TN", "unsure+", "unsure-", "TPR", "FPR"
    );
    for (rule, c) in confusion {
        let [tp, fn_, fp, tn, unsure_v, unsure_n, tpr, fpr] = confusion_row(c);
        let rule = t(rule);
        let _ = writeln!(
            out,
            "{rule:<19} {tp:>5} {fn_:>5} {fp:>5} {tn:>5} {unsure_v:>8} {unsure_n:>8} {tpr:>6} {fpr:>6}"
        );
    }
}

/// The confusion matrices and the per-cell flagged rates as text tables.
pub fn render_table(report: &ValidationReport) -> String {
    let mut out = String::new();
    let inputs = &report.inputs;
    if let Some(why) = &inputs.interrupted {
        let _ = writeln!(out, "PARTIAL REPORT: {}", t(why));
    }
    let _ = writeln!(out, "validation: {} — {}", t(&inputs.config), t(&report.description));
    let _ = writeln!(out, "payload: {}", t(&inputs.payload));
    for (i, host) in inputs.hosts.iter().enumerate() {
        let calibrated = if host.identity.calibrated {
            "calibrated"
        } else {
            "uncalibrated (defaults)"
        };
        let _ = writeln!(
            out,
            "host {i}: {} | detector {calibrated} | shards {}",
            t(&host.identity.label()),
            shard_list(&host.shards)
        );
    }
    for line in coverage_lines(report) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "{}", matrix_coverage_line(report));
    let _ = writeln!(out, "{}\n", truth_note(report));
    confusion_table(&mut out, &report.confusion);
    if report.per_host.len() > 1 {
        for host in &report.per_host {
            let _ = writeln!(out, "\nhost {}: {}", host.host, t(&host.label));
            confusion_table(&mut out, &host.confusion);
        }
    }
    let columns = columns(report);
    let _ = writeln!(out, "\nshare of runs flagged virtual, per cell (truth in brackets):");
    let label_of = |cell: &CellResult| {
        let evasion = match cell.evasion.as_str() {
            "none" => String::new(),
            evasion => format!(" | evade {}", t(evasion)),
        };
        format!(
            "{} | {}{evasion} | busy {} [{}]",
            t(&cell.mode),
            t(&cell.shaping),
            cell.busy,
            cell.truth.name()
        )
    };
    let width = report
        .cells
        .iter()
        .map(|c| label_of(c).chars().count())
        .max()
        .unwrap_or(0)
        .max(66);
    let _ = write!(out, "{:<width$}", "cell");
    for rule in &columns {
        let _ = write!(out, " {:>9}", heading(rule));
    }
    let _ = writeln!(out);
    for cell in &report.cells {
        let _ = write!(out, "{:<width$}", label_of(cell));
        match &cell.refused {
            Some(why) => {
                let _ = writeln!(out, " refused: {}", t(headline(why)));
            }
            None => {
                for cell_rate in flagged_rates(cell, &columns) {
                    let _ = write!(out, " {cell_rate:>9}");
                }
                let _ = writeln!(out);
            }
        }
    }
    arms_race_table(&mut out, report, &columns);
    for failure in &inputs.failures {
        let Some(cell) = inputs.matrix_cells.get(failure.cell) else {
            continue;
        };
        let _ = writeln!(
            out,
            "\nFAILED: {} | {} | busy {}, run {} on host {}: {}",
            t(&cell.mode),
            t(&cell.shaping),
            cell.busy,
            failure.repeat + 1,
            failure.host,
            t(&failure.why)
        );
    }
    if !report.requirements.is_empty() {
        let _ = writeln!(out, "\nrequirements:");
        for r in &report.requirements {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if r.met { "met" } else { "UNMET" },
                t(&r.requirement),
                t(&r.why)
            );
        }
    }
    out
}

/// Each rule's share of the cell's runs flagged virtual, in `columns` order.
fn flagged_rates<'a>(cell: &'a CellResult, columns: &'a [&'static str]) -> impl Iterator<Item = String> + 'a {
    columns.iter().map(|rule| {
        cell.rules
            .get(*rule)
            .map_or("—".into(), |r| format!("{:.2}", r.flagged_rate))
    })
}

/// The first clause of a refusal, for a table row (the JSON keeps the whole reason).
/// A refusal's first clause: up to its first ": " (what follows explains), whole where it
/// has none; never cut inside a parenthesis or a path.
fn headline(why: &str) -> &str {
    let end = why.find(": ").unwrap_or(why.len());
    why[..end].trim_end()
}

/// A rule's heading in the per-cell table's narrow columns.
fn heading(rule: &str) -> &str {
    crate::detector::rule(rule).map_or(rule, |r| r.heading)
}

fn markdown_confusion(out: &mut String, confusion: &BTreeMap<String, Confusion>) {
    let _ = writeln!(out, "| rule | TP | FN | FP | TN | unsure (virtual) | unsure (native) | TPR | FPR |\n|---|---|---|---|---|---|---|---|---|");
    for (rule, c) in confusion {
        let _ = writeln!(out, "| {} | {} |", md(rule), confusion_row(c).join(" | "));
    }
}

/// The same as Markdown (also what CI writes into its job summary).
pub fn render_markdown(report: &ValidationReport) -> String {
    let mut out = String::new();
    let inputs = &report.inputs;
    let _ = writeln!(
        out,
        "# Validation: {}\n\n{}\n\nPayload: {}.\n",
        md(&inputs.config),
        md(&report.description),
        md(&inputs.payload)
    );
    if let Some(why) = &inputs.interrupted {
        let _ = writeln!(out, "**Partial report**: {}.\n", md(why));
    }
    let _ = writeln!(
        out,
        "{} repeats of {} iterations per cell. {}.\n",
        inputs.matrix.repeats,
        inputs.matrix.iterations,
        truth_note(report)
    );
    let _ = writeln!(out, "| host | CPU | microcode | kernel | KVM | nested | detector | shards | coverage |\n|---|---|---|---|---|---|---|---|---|");
    for (index, (record, coverage)) in inputs.hosts.iter().zip(coverage_lines(report)).enumerate() {
        let host = &record.identity;
        let _ = writeln!(
            out,
            "| {index} | {} | {} | {} | {}{} | {} | {} | {} | {} |",
            md(&host.cpu_model),
            md(host.microcode.as_deref().unwrap_or("?")),
            md(host.kernel.as_deref().unwrap_or("?")),
            md(host.kvm.name()),
            host.kvm_module
                .as_deref()
                .map_or(String::new(), |m| format!(" ({})", md(m))),
            if host.host_is_vm { "yes" } else { "no" },
            if host.calibrated { "calibrated" } else { "uncalibrated" },
            shard_list(&record.shards),
            coverage.split_once(": ").map_or(coverage.as_str(), |(_, c)| c)
        );
    }
    let _ = writeln!(out, "\n{}.\n\n## Confusion matrices\n", matrix_coverage_line(report));
    markdown_confusion(&mut out, &report.confusion);
    if report.per_host.len() > 1 {
        for host in &report.per_host {
            let _ = writeln!(out, "\n### Host {}: {}\n", host.host, md(&host.label));
            markdown_confusion(&mut out, &host.confusion);
        }
    }
    if !report.requirements.is_empty() {
        let _ = writeln!(out, "\n## Requirements\n\n| requirement | met | why |\n|---|---|---|");
        for r in &report.requirements {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                md(&r.requirement),
                if r.met { "yes" } else { "**no**" },
                md(&r.why)
            );
        }
    }
    let columns = columns(report);
    let _ = write!(
        out,
        "\n## Share of runs flagged virtual, per cell\n\n| mode | shaping | busy | truth |"
    );
    for rule in &columns {
        let _ = write!(out, " {} |", md(rule));
    }
    let _ = write!(out, "\n|---|---|---|---|");
    for _ in &columns {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out);
    for cell in &report.cells {
        let _ = write!(
            out,
            "| {} | {} | {} | {} |",
            md(&cell.mode),
            md(&cell.shaping),
            cell.busy,
            cell.truth.name()
        );
        match &cell.refused {
            Some(why) => {
                let _ = write!(out, " refused: {} |", md(why));
                for _ in 1..columns.len() {
                    let _ = write!(out, " |");
                }
            }
            None => {
                for cell_rate in flagged_rates(cell, &columns) {
                    let _ = write!(out, " {cell_rate} |");
                }
            }
        }
        let _ = writeln!(out);
    }
    out
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
        let mut only_virtual = Confusion::default();
        only_virtual.add(
            Verdict::Virtual,
            VerdictCounts {
                virtual_: 1,
                native: 0,
                unsure: 0,
            },
        );
        assert_eq!(only_virtual.fpr, None);
    }
}
