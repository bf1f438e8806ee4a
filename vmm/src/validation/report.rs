//! A validation's report: everything derived from its records (per-cell results,
//! confusion matrices per rule and per host, coverage of the matrix, the arms race) and
//! its requirements judged.

use super::confusion::{Confusion, VerdictCounts};
use super::matrix::{ground_truth, HostJobs, Shard};
use super::records::{CellSpec, HostRecord, Refusal, RunRecord, ValidationInputs};
use super::requirements::{self, Requirement, RequirementResult};
use super::roc::{self, Roc};
use super::sweep::{self, Sweep, SweptCell};
use crate::detector::Verdict;
use crate::modes;
use crate::report::plot::PlotRun;
use guest_payload::Cycles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One rule over one cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellRule {
    pub counts: VerdictCounts,
    /// Share of runs flagged virtual: the TPR for a virtual cell, the FPR for a native one.
    pub flagged_rate: f64,
    /// Its exact 95% interval over the cell's runs.
    #[serde(default)]
    pub flagged_interval: Option<crate::stats::Interval>,
    pub score_min: f64,
    pub score_median: f64,
    pub score_max: f64,
}

/// One cell's outcome (per ground truth: a native cell is native on bare-metal hosts and
/// virtual on nested ones, and a merge of both shows two rows).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    /// Its index among the matrix's cells (derived again on every read, never stored).
    #[serde(skip)]
    pub index: usize,
    pub mode: String,
    pub shaping: String,
    pub busy: u16,
    #[serde(default = "crate::validation::records::no_evasion")]
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
    /// Where the cell ran to a precision (`--precision`): when and why it stopped, per host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopped: Vec<String>,
    /// Each probe's distribution over the cell's runs, and its distance to native, by
    /// probe name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub distributions: BTreeMap<String, Distribution>,
}

/// A probe's samples pooled over a cell's runs (from each run's sketch, every run weighing
/// the same): the percentiles an evasion author accepts a hide by, and how far the whole
/// distribution is from the native reference.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Distribution {
    pub p50: Cycles,
    pub p95: Cycles,
    pub p99: Cycles,
    /// Two-sample Kolmogorov–Smirnov distance to the native reference (every native run of
    /// the report, unshaped, unevaded, busy 0, of the same probe): 0 alike, 1 no overlap;
    /// absent without one.
    pub ks_to_native: Option<f64>,
}

impl Distribution {
    fn of(pooled: &crate::stats::Pooled, native: &crate::stats::Pooled) -> Option<Self> {
        Some(Self {
            p50: pooled.percentile(50.0)?,
            p95: pooled.percentile(95.0)?,
            p99: pooled.percentile(99.0)?,
            ks_to_native: pooled.ks_distance(native),
        })
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
    /// Jobs left unrun because their cell reached its precision (`--precision`).
    #[serde(default)]
    pub stopped: u64,
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
    /// Cells alike but for one number, as detection curves (`sweep`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sweeps: Vec<Sweep>,
    /// Each rule's ROC curve, where the matrix has two sides to put against each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roc: Option<Roc>,
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
    /// Per rule and column, what the rule made of the column and the evidence (`None`:
    /// not judged there).
    #[serde(default)]
    pub cells: BTreeMap<String, Vec<Option<ArmsCell>>>,
}

/// What a detector made of what a column stages, by the majority of the column's runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// A VM (evaded or not) called virtual.
    Caught,
    /// A VM called native (or unsure in no more than half the runs).
    Fooled,
    /// A host called virtual.
    FalseAlarm,
    /// A host called native.
    Quiet,
    /// Unsure in more than half the runs: the rule could not read what it needs.
    Unsure,
}

impl Outcome {
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Caught => "caught",
            Outcome::Fooled => "fooled",
            Outcome::FalseAlarm => "false alarm",
            Outcome::Quiet => "quiet",
            Outcome::Unsure => "unsure",
        }
    }

    /// By the majority of `runs`: flagged at half or more is virtual, unsure in more than
    /// half is unsure.
    fn of(truth: Verdict, flagged: u32, unsure: u32, runs: u32) -> Self {
        let virtual_ = 2 * flagged >= runs.max(1);
        match (truth, virtual_) {
            _ if !virtual_ && 2 * unsure > runs => Outcome::Unsure,
            (Verdict::Virtual, true) => Outcome::Caught,
            (Verdict::Virtual, false) => Outcome::Fooled,
            (_, true) => Outcome::FalseAlarm,
            (_, false) => Outcome::Quiet,
        }
    }
}

/// One rule over one column of the arms race.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArmsCell {
    pub outcome: Outcome,
    pub flagged: u32,
    pub unsure: u32,
    pub runs: u32,
    /// The why of the first run whose verdict is the outcome's: which clock, which rule.
    pub evidence: String,
}

fn arms_race(inputs: &ValidationInputs) -> ArmsRace {
    let mut columns: Vec<ArmsColumn> = Vec::new();
    let mut column_of: std::collections::HashMap<(String, Verdict), usize> = std::collections::HashMap::new();
    let mut flagged: BTreeMap<String, BTreeMap<usize, (u32, u32)>> = BTreeMap::new();
    let mut unsure: BTreeMap<(String, usize), u32> = BTreeMap::new();
    // The first why of each verdict kind, per rule and column.
    let mut whys: BTreeMap<(String, usize, Verdict), String> = BTreeMap::new();
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
            *unsure.entry((v.rule.clone(), column)).or_default() += u32::from(v.verdict == Verdict::Unsure);
            whys.entry((v.rule.clone(), column, v.verdict))
                .or_insert_with(|| v.why.clone());
        }
    }
    let cells = flagged
        .iter()
        .map(|(rule, by_column)| {
            let cells = (0..columns.len())
                .map(|c| {
                    let &(flagged, runs) = by_column.get(&c)?;
                    let unsure = unsure.get(&(rule.clone(), c)).copied().unwrap_or(0);
                    let outcome = Outcome::of(columns[c].truth, flagged, unsure, runs);
                    let said = match outcome {
                        Outcome::Caught | Outcome::FalseAlarm => [Verdict::Virtual, Verdict::Virtual],
                        Outcome::Unsure => [Verdict::Unsure, Verdict::Native],
                        Outcome::Fooled | Outcome::Quiet => [Verdict::Native, Verdict::Unsure],
                    };
                    let evidence = said
                        .iter()
                        .find_map(|v| whys.get(&(rule.clone(), c, *v)))
                        .cloned()
                        .unwrap_or_default();
                    Some(ArmsCell {
                        outcome,
                        flagged,
                        unsure,
                        runs,
                        evidence,
                    })
                })
                .collect();
            (rule.clone(), cells)
        })
        .collect();
    let rules = flagged
        .into_iter()
        .map(|(rule, by_column)| {
            let rates = (0..columns.len())
                .map(|c| by_column.get(&c).map(|&(v, n)| f64::from(v) / f64::from(n.max(1))))
                .collect();
            (rule, rates)
        })
        .collect();
    ArmsRace { columns, rules, cells }
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
        let sweeps = sweep::sweeps(cells.iter().map(|c| SweptCell {
            index: c.index,
            mode: &c.mode,
            shaping: &c.shaping,
            evasion: &c.evasion,
            busy: c.busy,
            truth: c.truth,
            rules: c.rules.iter().map(|(rule, r)| (rule.as_str(), r.counts)).collect(),
        }));
        let roc = roc_of(&inputs, &sweeps);
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
                    unsupported: None,
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
        let mut requirements = requirements::judge(&parsed, &confusion, matrix_coverage.missing > 0);
        requirements.extend(unparsed);
        Self {
            description: inputs.matrix.description.clone(),
            matrix_coverage,
            coverage,
            cells,
            confusion,
            per_host,
            arms_race,
            sweeps,
            roc,
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
        .parse::<modes::Path>()
        .map_or(crate::modes::Mode::HwAssist, modes::Path::mode);
    ground_truth(mode, host.is_none_or(|h| h.identity.host_is_vm))
}

/// The ROC's two sides: native runs against virtual ones; without native truth, the first
/// sweep's lowest value against its highest; `None` with neither.
fn roc_of(inputs: &ValidationInputs, sweeps: &[Sweep]) -> Option<Roc> {
    let of_truth = |truth: Verdict| inputs.runs.iter().filter(|r| r.truth == truth).collect::<Vec<_>>();
    let (natives, virtuals) = (of_truth(Verdict::Native), of_truth(Verdict::Virtual));
    if !natives.is_empty() && !virtuals.is_empty() {
        return Some(roc::roc(
            (
                "every native run (bare metal, or a profile that stages a real host)".into(),
                &natives,
            ),
            ("every virtual run".into(), &virtuals),
        ));
    }
    let sweep = sweeps.first()?;
    let (&low, low_cells) = sweep.cells_at.first_key_value()?;
    let (&high, high_cells) = sweep.cells_at.last_key_value()?;
    let of_cells = |cells: &[usize]| {
        inputs
            .runs
            .iter()
            .filter(|r| cells.contains(&r.cell))
            .collect::<Vec<_>>()
    };
    let at = |value| format!("the sweep of {} on {} at {value}", sweep.swept, sweep.cells);
    // The host-like side is the end that stages least: the low end of a sweep whose
    // curves rise (latency), the high end of one whose curves fall (an evader's divider).
    let falling = sweep.rules.values().filter(|c| c.falls).count() * 2 > sweep.rules.len();
    let (least, most) = if falling {
        ((high, high_cells), (low, low_cells))
    } else {
        ((low, low_cells), (high, high_cells))
    };
    Some(roc::roc(
        (
            format!(
                "{} (no native truth here: the end its curves call least virtual)",
                at(least.0)
            ),
            &of_cells(least.1),
        ),
        (at(most.0), &of_cells(most.1)),
    ))
}

/// The native reference distributions are drawn against, per probe: the sketches of
/// every native run, unshaped, unevaded and on an idle host.
fn native_reference(inputs: &ValidationInputs) -> BTreeMap<&'static str, crate::stats::Pooled> {
    let reference =
        |cell: &CellSpec| cell.mode == "native" && cell.shaping == "none" && cell.evasion == "none" && cell.busy == 0;
    let natives: Vec<&RunRecord> = inputs
        .runs
        .iter()
        .filter(|run| inputs.matrix_cells.get(run.cell).is_some_and(reference))
        .collect();
    guest_payload::Probe::ALL
        .iter()
        .map(|p| {
            (
                p.name(),
                crate::stats::Pooled::new(natives.iter().map(|r| r.sketch_of(p.name()))),
            )
        })
        .filter(|(_, pooled)| !pooled.is_empty())
        .collect()
}

fn cell_results(inputs: &ValidationInputs) -> Vec<CellResult> {
    let native = native_reference(inputs);
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
    let mut stops_of_cell: Vec<Vec<String>> = vec![Vec::new(); cells];
    for stop in &inputs.stops {
        if let Some(stops) = stops_of_cell.get_mut(stop.cell) {
            let host = if inputs.hosts.len() > 1 {
                format!("host {}: ", stop.host)
            } else {
                String::new()
            };
            stops.push(format!("{host}{}", stop.why));
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
                index,
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
                stopped: Vec::new(),
                distributions: BTreeMap::new(),
            });
            continue;
        }
        // Failed runs are told once per cell, on its first row.
        for (row, (truth, runs)) in by_truth.into_iter().enumerate() {
            let mut result = cell_result(
                (index, spec),
                truth,
                &runs,
                if row == 0 { failed_runs } else { 0 },
                &native,
            );
            if row == 0 {
                result.stopped = std::mem::take(&mut stops_of_cell[index]);
            }
            results.push(result);
        }
    }
    results
}

fn cell_result(
    (index, spec): (usize, &CellSpec),
    truth: Verdict,
    runs: &[&RunRecord],
    failed_runs: u32,
    native: &BTreeMap<&'static str, crate::stats::Pooled>,
) -> CellResult {
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
                flagged_interval: crate::stats::proportion_interval(counts.virtual_, counts.total()),
                score_min: at(0),
                score_median: at(scores.len().saturating_sub(1) / 2),
                score_max: at(scores.len().saturating_sub(1)),
            };
            (rule, cell_rule)
        })
        .collect();
    let median = |values: Vec<Cycles>| (!values.is_empty()).then(|| crate::stats::median(&values));
    CellResult {
        index,
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
        stopped: Vec::new(),
        distributions: guest_payload::Probe::ALL
            .iter()
            .filter_map(|p| {
                let pooled = crate::stats::Pooled::new(runs.iter().map(|r| r.sketch_of(p.name())));
                let none = crate::stats::Pooled::default();
                let reference = native.get(p.name()).unwrap_or(&none);
                Some((p.name().to_owned(), Distribution::of(&pooled, reference)?))
            })
            .collect(),
    }
}

/// Jobs of `shards` (cells × repeats, numbered cell by cell): counted, not enumerated,
/// for the shards of one partition (as `merge::check` requires of every host).
fn jobs_in(shards: &[Shard], cells: usize, repeats: u32) -> u64 {
    let total = cells as u64 * u64::from(repeats);
    match HostJobs::new(shards) {
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
    let taken: Vec<Option<HostJobs>> = inputs.hosts.iter().map(|h| HostJobs::new(&h.shards).ok()).collect();
    // A cell stopped at its precision covers the jobs of the cell its shard holds.
    for stop in inputs.stops.iter().filter(|s| s.jobs > 0) {
        covered.extend((0..repeats).map(|r| job(stop.cell, r)).filter(|&j| stop.shard.takes(j)));
    }
    // A refused cell covers every job of the cell that its host's shards hold.
    for (host_index, cell) in inputs.refusals.iter().map(|r| (r.host, r.cell)) {
        let shards = inputs.hosts.get(host_index).map_or(&[][..], |h| h.shards.as_slice());
        let host = taken.get(host_index).and_then(Option::as_ref);
        covered.extend((0..repeats).map(|r| job(cell, r)).filter(|&j| match host {
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
    let mut stopped = vec![0u64; hosts];
    for stop in &inputs.stops {
        if let Some(n) = stopped.get_mut(stop.host) {
            *n += u64::from(stop.jobs);
        }
    }
    (0..hosts)
        .map(|host| {
            let jobs = jobs_in(
                &inputs.hosts[host].shards,
                inputs.matrix_cells.len(),
                inputs.matrix.repeats,
            );
            let (ran, refused, failed, stopped) = (ran[host], refused[host], failed[host], stopped[host]);
            HostCoverage {
                host,
                jobs,
                ran,
                refused,
                failed,
                stopped,
                missing: jobs.saturating_sub(ran + refused + failed + stopped),
            }
        })
        .collect()
}
