//! Validation: an experiment matrix (modes × shaping × busyness, each repeated) and the
//! scoring of every detector rule against the ground truth of each cell.
//!
//! Ground truth: every VM cell is virtual. A native cell is what the host is: on bare
//! metal native, on a host that is itself a VM (`doctor` knows), virtual — and the reports
//! say so, because then a rule flagging native runs is right, not a false positive.

use crate::detector::{rule_columns, RuleVerdict, Verdict, RULES};
use crate::modes::{Mode, Path as CpuidPath};
use crate::shaping::profile::{Profile, ProfileError};
use crate::shaping::{plan, Shaping};
use guest_payload::Cycles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("cannot read the validation config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the validation config {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("the validation config {path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

/// A validation config file (see `configs/README.md`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatrixConfig {
    pub description: String,
    /// Runs per cell.
    pub repeats: u32,
    pub iterations: u32,
    #[serde(default = "default_warmup")]
    pub warmup: u32,
    /// Paths, spelled as `modes::Path` spells them: `native`, `hw-assist`, `trap-emulate`
    /// (= `trap-emulate:hw-breakpoint`), `trap-emulate:int3-patch`, `trap-emulate:io-patch`,
    /// `paravirt`.
    pub modes: Vec<String>,
    /// `none`, `inject-ns:N`, `inject-cycles:N`, `virtual-inject-cycles:N`, `hide`,
    /// `hide:C`, `profile:NAME`. Shaping applies to trap-emulate and paravirt cells only.
    #[serde(default = "default_shaping")]
    pub shaping: Vec<String>,
    /// Host threads burning CPU, one cell per value.
    #[serde(default = "default_busy")]
    pub busy: Vec<u16>,
}

fn default_warmup() -> u32 {
    100
}
fn default_shaping() -> Vec<String> {
    vec!["none".into()]
}
fn default_busy() -> Vec<u16> {
    vec![0]
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub path: CpuidPath,
    pub shaping_label: String,
    pub shaping: Shaping,
    pub busy: u16,
}

impl Cell {
    pub fn label(&self) -> String {
        format!("{} | {} | busy {}", self.path, self.shaping_label, self.busy)
    }
}

fn parse_shaping(text: &str, tsc_khz: u32) -> Result<Option<Shaping>, ProfileError> {
    let (kind, value) = text.split_once(':').map_or((text, None), |(k, v)| (k, Some(v)));
    let number = value.and_then(|v| v.parse::<u64>().ok());
    Ok(match (kind, value) {
        ("none", None) => Some(Shaping::None),
        ("inject-ns", Some(_)) => number.map(|ns| Shaping::Inject {
            cycles: plan::ns_to_cycles(ns, tsc_khz),
        }),
        ("inject-cycles", Some(_)) => number.map(|cycles| Shaping::Inject { cycles }),
        ("virtual-inject-cycles", Some(_)) => number.map(|cycles| Shaping::VirtualInject { cycles }),
        ("hide", None) => Some(Shaping::Hide { target: None }),
        ("hide", Some(_)) => number.map(|target| Shaping::Hide { target: Some(target) }),
        ("profile", Some(name)) => Some(Shaping::Profile {
            profile: Box::new(Profile::load(name)?),
            seed: 0x5eed,
        }),
        _ => None,
    })
}

impl MatrixConfig {
    pub fn load(path: &Path) -> Result<Self, ValidationError> {
        let text = std::fs::read_to_string(path).map_err(|source| ValidationError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|source| ValidationError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |why: String| ValidationError::Invalid {
            path: path.to_owned(),
            why,
        };
        if config.repeats == 0 || config.repeats > 10_000 {
            return Err(invalid(format!("repeats must be 1..=10000, not {}", config.repeats)));
        }
        if config.iterations == 0 || config.iterations > crate::measure::MAX_ITERATIONS {
            return Err(invalid(format!(
                "iterations must be 1..={}, not {}",
                crate::measure::MAX_ITERATIONS,
                config.iterations
            )));
        }
        if config.modes.is_empty() || config.shaping.is_empty() || config.busy.is_empty() {
            return Err(invalid("modes, shaping and busy each need at least one value".into()));
        }
        if let Some(Err(why)) = config.modes.iter().map(|m| m.parse::<CpuidPath>()).find(Result::is_err) {
            return Err(invalid(why));
        }
        if let Some(&busy) = config.busy.iter().find(|&&b| b > 256) {
            return Err(invalid(format!("busy {busy} is more than 256 threads")));
        }
        Ok(config)
    }

    /// The cells, in config order; shaping other than `none` only for the modes whose
    /// exits the VMM handles.
    pub fn cells(&self, tsc_khz: u32, path: &Path) -> Result<Vec<Cell>, ValidationError> {
        let mut cells = Vec::new();
        for mode_text in &self.modes {
            let cpuid_path: CpuidPath = mode_text.parse().map_err(|why| ValidationError::Invalid {
                path: path.to_owned(),
                why,
            })?;
            for shaping_text in &self.shaping {
                let shaping = parse_shaping(shaping_text, tsc_khz)?.ok_or_else(|| ValidationError::Invalid {
                    path: path.to_owned(),
                    why: format!("unknown shaping `{shaping_text}` (none, inject-ns:N, inject-cycles:N, virtual-inject-cycles:N, hide, hide:C, profile:NAME)"),
                })?;
                if shaping != Shaping::None && !cpuid_path.vmm_handles_cpuid() {
                    continue;
                }
                for &busy in &self.busy {
                    cells.push(Cell {
                        path: cpuid_path,
                        shaping_label: shaping_text.clone(),
                        shaping: shaping.clone(),
                        busy,
                    });
                }
            }
        }
        Ok(cells)
    }
}

/// What the cell's runs truly are.
pub fn ground_truth(mode: Mode, host_is_vm: bool) -> Verdict {
    match mode {
        Mode::Native if !host_is_vm => Verdict::Native,
        _ => Verdict::Virtual,
    }
}

/// Counts of one rule's verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, Serialize)]
pub struct CellRule {
    pub counts: VerdictCounts,
    /// Share of runs flagged virtual: the TPR for a virtual cell, the FPR for a native one.
    pub flagged_rate: f64,
    pub score_min: f64,
    pub score_median: f64,
    pub score_max: f64,
}

/// One cell's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CellResult {
    pub mode: String,
    pub shaping: String,
    pub busy: u16,
    pub truth: Verdict,
    pub runs: u32,
    /// Why the cell could not run on this host (e.g. TSC moves not honoured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Runs that failed after others had succeeded (kept: nothing measured is lost).
    pub failed_runs: u32,
    pub rules: BTreeMap<&'static str, CellRule>,
    /// Median CPUID and NOP medians over the cell's runs.
    pub cpuid_median: Option<Cycles>,
    pub nop_median: Option<Cycles>,
}

/// A rule's confusion matrix over every cell that ran.
#[derive(Clone, Debug, Default, Serialize)]
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

/// Collects each cell's runs.
pub struct CellAccumulator {
    truth: Verdict,
    verdicts: BTreeMap<&'static str, (VerdictCounts, Vec<f64>)>,
    cpuid_medians: Vec<Cycles>,
    nop_medians: Vec<Cycles>,
    runs: u32,
}

impl CellAccumulator {
    pub fn new(truth: Verdict) -> Self {
        Self {
            truth,
            verdicts: BTreeMap::new(),
            cpuid_medians: Vec::new(),
            nop_medians: Vec::new(),
            runs: 0,
        }
    }

    pub fn add(&mut self, verdicts: &[RuleVerdict], cpuid_median: Option<Cycles>, nop_median: Option<Cycles>) {
        self.runs += 1;
        for v in verdicts {
            let entry = self.verdicts.entry(v.rule).or_default();
            entry.0.add(v.verdict);
            entry.1.push(v.score);
        }
        self.cpuid_medians.extend(cpuid_median);
        self.nop_medians.extend(nop_median);
    }

    pub fn finish(self, cell: &Cell, refused: Option<String>, failed_runs: u32) -> CellResult {
        let rules = self
            .verdicts
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
        let median = |v: &[Cycles]| (!v.is_empty()).then(|| crate::stats::median(v));
        CellResult {
            mode: cell.path.to_string(),
            shaping: cell.shaping_label.clone(),
            busy: cell.busy,
            truth: self.truth,
            runs: self.runs,
            refused,
            failed_runs,
            rules,
            cpuid_median: median(&self.cpuid_medians),
            nop_median: median(&self.nop_medians),
        }
    }
}

/// The whole validation.
#[derive(Clone, Debug, Serialize)]
pub struct ValidationReport {
    pub schema_version: u32,
    pub config: String,
    pub description: String,
    /// The payload every cell ran: where it came from and the name it declares.
    pub payload: String,
    pub host: serde_json::Value,
    pub host_is_vm: bool,
    /// What the native cells are labelled, and why.
    pub native_truth: String,
    pub calibrated: bool,
    pub repeats: u32,
    pub iterations: u32,
    pub cells: Vec<CellResult>,
    pub confusion: BTreeMap<&'static str, Confusion>,
}

impl ValidationReport {
    pub fn confusion_of(cells: &[CellResult]) -> BTreeMap<&'static str, Confusion> {
        let mut confusion: BTreeMap<&'static str, Confusion> =
            RULES.iter().map(|&r| (r, Confusion::default())).collect();
        for cell in cells {
            for (rule, result) in &cell.rules {
                confusion.entry(rule).or_default().add(cell.truth, result.counts);
            }
        }
        confusion
    }
}

/// TP, FN, FP, TN, unsure on virtual, unsure on native, TPR, FPR: one rule's row, in the
/// order both renderings use.
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

/// The confusion matrices and the per-cell flagged rates as text tables.
pub fn render_table(report: &ValidationReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "validation: {} — {}", report.config, report.description);
    let _ = writeln!(out, "payload: {}", report.payload);
    let _ = writeln!(
        out,
        "native cells are labelled {}; detector {}\n",
        report.native_truth,
        if report.calibrated {
            "calibrated"
        } else {
            "uncalibrated (defaults)"
        }
    );
    let _ = writeln!(
        out,
        "{:<19} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>6}",
        "rule", "TP", "FN", "FP", "TN", "unsure+", "unsure-", "TPR", "FPR"
    );
    for (rule, c) in &report.confusion {
        let [tp, fn_, fp, tn, unsure_v, unsure_n, tpr, fpr] = confusion_row(c);
        let _ = writeln!(
            out,
            "{rule:<19} {tp:>5} {fn_:>5} {fp:>5} {tn:>5} {unsure_v:>8} {unsure_n:>8} {tpr:>6} {fpr:>6}"
        );
    }
    let columns = rule_columns(report.confusion.keys().copied());
    let _ = writeln!(out, "\nshare of runs flagged virtual, per cell (truth in brackets):");
    let _ = write!(out, "{:<66}", "cell");
    for rule in &columns {
        let _ = write!(out, " {:>9}", short(rule));
    }
    let _ = writeln!(out);
    for cell in &report.cells {
        let label = format!(
            "{} | {} | busy {} [{}]",
            cell.mode,
            cell.shaping,
            cell.busy,
            cell.truth.name()
        );
        let _ = write!(out, "{label:<66}");
        match &cell.refused {
            Some(why) => {
                let _ = writeln!(out, " refused: {}", headline(why));
            }
            None => {
                for cell_rate in flagged_rates(cell, &columns) {
                    let _ = write!(out, " {cell_rate:>9}");
                }
                let _ = writeln!(out);
            }
        }
    }
    out
}

/// Each rule's share of the cell's runs flagged virtual, in `columns` order.
fn flagged_rates<'a>(cell: &'a CellResult, columns: &'a [&'static str]) -> impl Iterator<Item = String> + 'a {
    columns.iter().map(|rule| {
        cell.rules
            .get(rule)
            .map_or("—".into(), |r| format!("{:.2}", r.flagged_rate))
    })
}

/// The first clause of a refusal, for a table row (the JSON keeps the whole reason).
fn headline(why: &str) -> &str {
    let end = why.find([':', '(']).unwrap_or(why.len());
    why[..end].trim_end()
}

fn short(rule: &str) -> &str {
    match rule {
        "fixed-threshold" => "fixed",
        "tsc-lfence-ratio" => "lfence",
        "hypervisor-bit" => "hv-bit",
        "code-integrity" => "integrity",
        "tsc-monotonic" => "monotonic",
        other => other,
    }
}

/// The same as Markdown.
pub fn render_markdown(report: &ValidationReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Validation: {}\n\n{}\n\nPayload: {}.\n",
        report.config, report.description, report.payload
    );
    let _ = writeln!(
        out,
        "{} repeats of {} iterations per cell. Native cells are labelled {}. Detector {}.\n",
        report.repeats,
        report.iterations,
        report.native_truth,
        if report.calibrated {
            "calibrated on this host"
        } else {
            "uncalibrated (documented defaults)"
        }
    );
    let _ = writeln!(out, "## Confusion matrices\n\n| rule | TP | FN | FP | TN | unsure (virtual) | unsure (native) | TPR | FPR |\n|---|---|---|---|---|---|---|---|---|");
    for (rule, c) in &report.confusion {
        let _ = writeln!(out, "| {rule} | {} |", confusion_row(c).join(" | "));
    }
    let columns = rule_columns(report.confusion.keys().copied());
    let _ = write!(
        out,
        "\n## Share of runs flagged virtual, per cell\n\n| mode | shaping | busy | truth |"
    );
    for rule in &columns {
        let _ = write!(out, " {rule} |");
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
            cell.mode,
            cell.shaping,
            cell.busy,
            cell.truth.name()
        );
        match &cell.refused {
            Some(why) => {
                let _ = write!(out, " refused: {} |", why.replace('|', "/"));
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

    fn config(text: &str) -> Result<MatrixConfig, ValidationError> {
        let path = std::env::temp_dir().join(format!("vmm-validation-{}-{}.json", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let result = MatrixConfig::load(&path);
        std::fs::remove_file(&path).ok();
        result
    }

    #[test]
    fn shaping_expands_only_for_vmm_handled_modes() {
        let c = config(r#"{"description":"t","repeats":2,"iterations":10,"modes":["native","hw-assist","paravirt","trap-emulate:int3-patch"],"shaping":["none","inject-ns:1000","hide"],"busy":[0,2]}"#).unwrap();
        let cells = c.cells(2_000_000, Path::new("t.json")).unwrap();
        // native, hw-assist: 1 shaping × 2 busy; paravirt, trap: 3 × 2.
        assert_eq!(cells.len(), 2 + 2 + 6 + 6);
        assert!(cells
            .iter()
            .filter(|c| c.path == CpuidPath::Native)
            .all(|c| c.shaping == Shaping::None));
        assert!(cells.iter().any(|c| c.shaping == Shaping::Inject { cycles: 2_000 }));
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        assert!(matches!(config("{"), Err(ValidationError::Parse { .. })));
        let unknown_mode = config(r#"{"description":"t","repeats":1,"iterations":10,"modes":["vmware"]}"#);
        assert!(matches!(unknown_mode, Err(ValidationError::Invalid { why, .. }) if why.contains("vmware")));
        let zero = config(r#"{"description":"t","repeats":0,"iterations":10,"modes":["native"]}"#);
        assert!(matches!(zero, Err(ValidationError::Invalid { .. })));
        let bad_shaping = config(
            r#"{"description":"t","repeats":1,"iterations":10,"modes":["paravirt"],"shaping":["inject-ns:lots"]}"#,
        )
        .unwrap();
        assert!(bad_shaping.cells(1, Path::new("t")).is_err());
    }

    #[test]
    fn native_cells_are_virtual_on_a_virtual_host() {
        assert_eq!(ground_truth(Mode::Native, false), Verdict::Native);
        assert_eq!(ground_truth(Mode::Native, true), Verdict::Virtual);
        assert_eq!(ground_truth(Mode::HwAssist, false), Verdict::Virtual);
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
