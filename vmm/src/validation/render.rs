//! A validation report rendered: a text table for the terminal, Markdown (what CI writes
//! into a job summary) and JUnit XML (one test case per cell × rule, so CI systems show the
//! result natively). Every text from a report is escaped for where it goes.

use super::confusion::Confusion;
use super::matrix::Shard;
use super::report::Outcome;
use super::report::{CellResult, ValidationReport};
use super::sweep::Crossing;
use crate::detector::{rule_columns, Verdict};
use crate::escape::{markdown as md, terminal as t};
use crate::stats::Interval;
use std::collections::BTreeMap;
use std::fmt::Write;

/// A renderer that could not format its text (formatting into a `String` fails only
/// where a value's own formatting does).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot render the validation table: {0}")]
    Table(std::fmt::Error),
    #[error("cannot render the validation Markdown: {0}")]
    Markdown(std::fmt::Error),
    #[error("cannot render the validation JUnit XML: {0}")]
    Junit(std::fmt::Error),
}

fn shard_list(shards: &[Shard]) -> String {
    shards.iter().map(Shard::to_string).collect::<Vec<_>>().join(", ")
}

/// TP, FN, FP, TN, unsure on virtual, unsure on native, TPR, FPR: one rule's row, each
/// rate with its exact 95% interval.
fn confusion_row(c: &Confusion) -> [String; 8] {
    [
        c.true_positive.to_string(),
        c.false_negative.to_string(),
        c.false_positive.to_string(),
        c.true_negative.to_string(),
        c.unsure_on_virtual.to_string(),
        c.unsure_on_native.to_string(),
        rate(c.tpr, c.tpr_interval),
        rate(c.fpr, c.fpr_interval),
    ]
}

/// `0.80 [0.44, 0.97]`: a rate and its interval.
fn rate(rate: Option<f64>, interval: Option<Interval>) -> String {
    match (rate, interval) {
        (Some(r), Some(i)) => format!("{r:.2} {i}"),
        (Some(r), None) => format!("{r:.2}"),
        (None, _) => "—".into(),
    }
}

/// `0.80 .44-.97`: the same, narrow enough for a column per rule.
fn short_rate(rate: f64, interval: Option<Interval>) -> String {
    let bound = |x: f64| {
        let text = format!("{x:.2}");
        match text.strip_prefix('0') {
            Some(rest) => rest.to_owned(),
            None => "1".to_owned(),
        }
    };
    match interval {
        Some(i) => format!("{rate:.2} {}-{}", bound(i.lower), bound(i.upper)),
        None => format!("{rate:.2}"),
    }
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
            let stopped = if c.stopped > 0 {
                format!(", {} left unrun at the precision asked", c.stopped)
            } else {
                String::new()
            };
            format!(
                "host {}: {} of {} jobs ran, {} refused, {} failed{stopped} — {state}",
                c.host, c.ran, c.jobs, c.refused, c.failed
            )
        })
        .collect()
}

fn confusion_table(out: &mut String, confusion: &BTreeMap<String, Confusion>) -> std::fmt::Result {
    writeln!(
        out,
        "{:<19} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:>17} {:>17}",
        "rule", "TP", "FN", "FP", "TN", "unsure+", "unsure-", "TPR [95%, exact]", "FPR [95%, exact]"
    )?;
    for (rule, c) in confusion {
        let [tp, fn_, fp, tn, unsure_v, unsure_n, tpr, fpr] = confusion_row(c);
        let rule = t(rule);
        writeln!(
            out,
            "{rule:<19} {tp:>5} {fn_:>5} {fp:>5} {tn:>5} {unsure_v:>8} {unsure_n:>8} {tpr:>17} {fpr:>17}"
        )?;
    }
    Ok(())
}

/// The confusion matrices and the per-cell flagged rates as text tables.
pub fn table(report: &ValidationReport) -> Result<String, RenderError> {
    let mut out = String::new();
    write_table(&mut out, report).map_err(RenderError::Table)?;
    Ok(out)
}

fn write_table(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    let inputs = &report.inputs;
    if let Some(why) = &inputs.interrupted {
        writeln!(out, "PARTIAL REPORT: {}", t(why))?;
    }
    writeln!(out, "validation: {} — {}", t(&inputs.config), t(&report.description))?;
    writeln!(out, "payload: {}", t(&inputs.payload))?;
    for (i, host) in inputs.hosts.iter().enumerate() {
        let calibrated = if host.identity.calibrated {
            "calibrated"
        } else {
            "uncalibrated (defaults)"
        };
        writeln!(
            out,
            "host {i}: {} | detector {calibrated} | shards {}",
            t(&host.identity.label()),
            shard_list(&host.shards)
        )?;
    }
    for line in coverage_lines(report) {
        writeln!(out, "{line}")?;
    }
    writeln!(out, "{}", matrix_coverage_line(report))?;
    writeln!(out, "{}\n", truth_note(report))?;
    confusion_table(out, &report.confusion)?;
    if report.per_host.len() > 1 {
        for host in &report.per_host {
            writeln!(out, "\nhost {}: {}", host.host, t(&host.label))?;
            confusion_table(out, &host.confusion)?;
        }
    }
    let columns = columns(report);
    writeln!(
        out,
        "\nshare of runs flagged virtual, per cell (truth in brackets), and its exact 95% interval:"
    )?;
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
    write!(out, "{:<width$}", "cell")?;
    for rule in &columns {
        write!(out, " {:>13}", heading(rule))?;
    }
    writeln!(out)?;
    for cell in &report.cells {
        write!(out, "{:<width$}", label_of(cell))?;
        match &cell.refused {
            Some(why) => {
                writeln!(out, " refused: {}", t(headline(why)))?;
            }
            None => {
                for cell_rate in flagged_rates(cell, &columns, short_rate) {
                    write!(out, " {cell_rate:>13}")?;
                }
                writeln!(out)?;
            }
        }
    }
    if let Some(width) = inputs.matrix.precision {
        writeln!(
            out,
            "\nprecision: each cell ran until every rule's 95% interval was at most {width} wide, at most {} runs:",
            inputs.matrix.repeats
        )?;
        for cell in report.cells.iter().filter(|c| !c.stopped.is_empty()) {
            writeln!(out, "  {}: {}", label_of(cell), t(&cell.stopped.join("; ")))?;
        }
    }
    distribution_table(out, report, &label_of, width)?;
    sweep_tables(out, report)?;
    roc_table(out, report)?;
    arms_race_table(out, report, &columns)?;
    for attempt in &inputs.retried {
        let Some(cell) = inputs.matrix_cells.get(attempt.cell) else {
            continue;
        };
        writeln!(
            out,
            "\nretried in a fresh VM: {} | {} | {} | busy {}, run {} on host {}, whose first attempt failed: {}",
            t(&cell.mode),
            t(&cell.shaping),
            t(&cell.evasion),
            cell.busy,
            attempt.repeat + 1,
            attempt.host,
            t(&attempt.why)
        )?;
    }
    for failure in &inputs.failures {
        let Some(cell) = inputs.matrix_cells.get(failure.cell) else {
            continue;
        };
        writeln!(
            out,
            "\nFAILED: {} | {} | busy {}, run {} on host {}: {}",
            t(&cell.mode),
            t(&cell.shaping),
            cell.busy,
            failure.repeat + 1,
            failure.host,
            t(&failure.why)
        )?;
    }
    if !report.requirements.is_empty() {
        writeln!(out, "\nrequirements:")?;
        for r in &report.requirements {
            writeln!(
                out,
                "  [{}] {}: {}",
                if r.met { "met" } else { "UNMET" },
                t(&r.requirement),
                t(&r.why)
            )?;
        }
    }
    Ok(())
}

/// Where a curve crosses a rate, in words.
fn crossing_text(c: &Crossing, falls: bool) -> String {
    let word = if falls { "up to" } else { "from" };
    match (c.at, c.earliest, c.surely) {
        (Some(at), earliest, surely) => format!(
            "{word} {at} (the 95% intervals: {word} {} at best, {})",
            earliest.unwrap_or(at),
            surely.map_or("surely nowhere in the sweep".to_owned(), |s| format!(
                "{word} {s} surely"
            ))
        ),
        (None, Some(earliest), _) => format!("not in the sweep (the 95% intervals allow {word} {earliest})"),
        (None, None, _) => "nowhere in the sweep".to_owned(),
    }
}

/// Each rule's ROC: its AUC and where its own threshold sits.
fn roc_table(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    let Some(roc) = &report.roc else { return Ok(()) };
    writeln!(
        out,
        "\nROC per rule, its threshold moved over the scores: {} against {} (AUC 0.5 a coin, 1 a clean split):",
        t(&roc.negatives),
        t(&roc.positives)
    )?;
    writeln!(
        out,
        "{:<19} {:>6} {:>9} {:>9} {:>22}",
        "rule", "AUC", "negatives", "positives", "its own threshold at"
    )?;
    for (rule, r) in &roc.rules {
        writeln!(
            out,
            "{:<19} {:>6.3} {:>9} {:>9} {:>22}",
            t(rule),
            r.auc,
            r.negatives,
            r.positives,
            format!("FPR {:.2}, TPR {:.2}", r.operating[0], r.operating[1])
        )?;
    }
    Ok(())
}

/// Each sweep: the rules' detection rates against the swept value, and where each starts
/// (or stops) detecting.
fn sweep_tables(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    for sweep in &report.sweeps {
        writeln!(
            out,
            "\nsweep of {} on {} [{}]: share of runs flagged virtual, and its exact 95% interval:",
            t(&sweep.swept),
            t(&sweep.cells),
            sweep.truth.name()
        )?;
        let rules: Vec<&String> = sweep.rules.keys().collect();
        write!(out, "{:>10}", t(&sweep.swept))?;
        for rule in &rules {
            write!(out, " {:>13}", heading(rule))?;
        }
        writeln!(out)?;
        for value in &sweep.values {
            write!(out, "{value:>10}")?;
            for rule in &rules {
                let point = sweep.rules[*rule].points.iter().find(|p| p.value == *value);
                let text = point.map_or("—".to_owned(), |p| short_rate(p.rate, p.interval));
                write!(out, " {text:>13}")?;
            }
            writeln!(out)?;
        }
        for rule in &rules {
            let curve = &sweep.rules[*rule];
            writeln!(
                out,
                "  {:<19} half the time {}; 95% of the time {}",
                t(rule),
                crossing_text(&curve.half, curve.falls),
                crossing_text(&curve.most, curve.falls)
            )?;
        }
    }
    Ok(())
}

/// The probes some cell has a distribution of, in measurement order.
fn distributed_probes(report: &ValidationReport) -> Vec<&'static str> {
    guest_payload::Probe::ALL
        .iter()
        .map(|p| p.name())
        .filter(|name| report.cells.iter().any(|c| c.distributions.contains_key(*name)))
        .collect()
}

/// Each cell's CPUID distribution (what an evasion author judges a hide by), then every
/// probe's distance to native.
fn distribution_table(
    out: &mut String,
    report: &ValidationReport,
    label_of: &dyn Fn(&CellResult) -> String,
    width: usize,
) -> std::fmt::Result {
    let probes = distributed_probes(report);
    if probes.is_empty() {
        return Ok(());
    }
    let cpuid = guest_payload::Probe::Cpuid.name();
    if probes.contains(&cpuid) {
        writeln!(
            out,
            "\nCPUID cycles per cell (pooled over its runs), and the Kolmogorov–Smirnov distance to native \
             (every native run, unshaped, idle; 0 alike, 1 apart):"
        )?;
        writeln!(
            out,
            "{:<width$} {:>10} {:>10} {:>10} {:>8}",
            "cell", "p50", "p95", "p99", "KS"
        )?;
        for cell in &report.cells {
            let Some(d) = cell.distributions.get(cpuid) else {
                continue;
            };
            let ks = d.ks_to_native.map_or("—".to_owned(), |ks| format!("{ks:.3}"));
            writeln!(
                out,
                "{:<width$} {:>10} {:>10} {:>10} {ks:>8}",
                label_of(cell),
                d.p50,
                d.p95,
                d.p99
            )?;
        }
    }
    writeln!(
        out,
        "\nKolmogorov–Smirnov distance to native, per probe (p50/p95/p99 of each in the JSON and Markdown):"
    )?;
    write!(out, "{:<width$}", "cell")?;
    for probe in &probes {
        write!(out, " {:>14}", probe)?;
    }
    writeln!(out)?;
    for cell in report.cells.iter().filter(|c| !c.distributions.is_empty()) {
        write!(out, "{:<width$}", label_of(cell))?;
        for probe in &probes {
            let ks = cell
                .distributions
                .get(*probe)
                .and_then(|d| d.ks_to_native)
                .map_or("—".to_owned(), |ks| format!("{ks:.3}"));
            write!(out, " {ks:>14}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Each rule's share of the cell's runs flagged virtual and its interval, in `columns`
/// order, as `show` writes them.
fn flagged_rates<'a>(
    cell: &'a CellResult,
    columns: &'a [&'static str],
    show: fn(f64, Option<Interval>) -> String,
) -> impl Iterator<Item = String> + 'a {
    columns.iter().map(move |rule| {
        cell.rules
            .get(*rule)
            .map_or("—".into(), |r| show(r.flagged_rate, r.flagged_interval))
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

fn markdown_confusion(out: &mut String, confusion: &BTreeMap<String, Confusion>) -> std::fmt::Result {
    writeln!(out, "| rule | TP | FN | FP | TN | unsure (virtual) | unsure (native) | TPR [95% exact] | FPR [95% exact] |\n|---|---|---|---|---|---|---|---|---|")?;
    for (rule, c) in confusion {
        writeln!(out, "| {} | {} |", md(rule), confusion_row(c).join(" | "))?;
    }
    Ok(())
}

/// The same as Markdown (also what CI writes into its job summary).
pub fn markdown(report: &ValidationReport) -> Result<String, RenderError> {
    let mut out = String::new();
    write_markdown(&mut out, report).map_err(RenderError::Markdown)?;
    Ok(out)
}

fn write_markdown(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    let inputs = &report.inputs;
    writeln!(
        out,
        "# Validation: {}\n\n{}\n\nPayload: {}.\n",
        md(&inputs.config),
        md(&report.description),
        md(&inputs.payload)
    )?;
    if let Some(why) = &inputs.interrupted {
        writeln!(out, "**Partial report**: {}.\n", md(why))?;
    }
    writeln!(
        out,
        "{} repeats of {} iterations per cell. {}.\n",
        inputs.matrix.repeats,
        inputs.matrix.iterations,
        truth_note(report)
    )?;
    writeln!(out, "| host | CPU | microcode | kernel | KVM | nested | detector | shards | coverage |\n|---|---|---|---|---|---|---|---|---|")?;
    for (index, (record, coverage)) in inputs.hosts.iter().zip(coverage_lines(report)).enumerate() {
        let host = &record.identity;
        writeln!(
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
        )?;
    }
    writeln!(out, "\n{}.\n\n## Confusion matrices\n", matrix_coverage_line(report))?;
    markdown_confusion(out, &report.confusion)?;
    if report.per_host.len() > 1 {
        for host in &report.per_host {
            writeln!(out, "\n### Host {}: {}\n", host.host, md(&host.label))?;
            markdown_confusion(out, &host.confusion)?;
        }
    }
    if !report.requirements.is_empty() {
        writeln!(out, "\n## Requirements\n\n| requirement | met | why |\n|---|---|---|")?;
        for r in &report.requirements {
            writeln!(
                out,
                "| {} | {} | {} |",
                md(&r.requirement),
                if r.met { "yes" } else { "**no**" },
                md(&r.why)
            )?;
        }
    }
    let columns = columns(report);
    write!(
        out,
        "\n## Share of runs flagged virtual, per cell\n\nEach with its exact (Clopper–Pearson) 95% interval over the cell's runs.\n\n| mode | shaping | busy | truth |"
    )?;
    for rule in &columns {
        write!(out, " {} |", md(rule))?;
    }
    write!(out, "\n|---|---|---|---|")?;
    for _ in &columns {
        write!(out, "---|")?;
    }
    writeln!(out)?;
    for cell in &report.cells {
        write!(
            out,
            "| {} | {} | {} | {} |",
            md(&cell.mode),
            md(&cell.shaping),
            cell.busy,
            cell.truth.name()
        )?;
        match &cell.refused {
            Some(why) => {
                write!(out, " refused: {} |", md(why))?;
                for _ in 1..columns.len() {
                    write!(out, " |")?;
                }
            }
            None => {
                for cell_rate in flagged_rates(cell, &columns, |r, i| rate(Some(r), i)) {
                    write!(out, " {cell_rate} |")?;
                }
            }
        }
        writeln!(out)?;
    }
    if let Some(width) = inputs.matrix.precision {
        writeln!(
            out,
            "\n## Precision\n\nEach cell ran until every rule's exact 95% interval was at most {width} wide, at most {} runs.\n\n| mode | shaping | evasion | busy | runs | stopped |\n|---|---|---|---|---|---|",
            inputs.matrix.repeats
        )?;
        for cell in report.cells.iter().filter(|c| !c.stopped.is_empty()) {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                md(&cell.mode),
                md(&cell.shaping),
                md(&cell.evasion),
                cell.busy,
                cell.runs,
                md(&cell.stopped.join("; "))
            )?;
        }
    }
    if !inputs.retried.is_empty() {
        writeln!(
            out,
            "\n## Runs retried in a fresh VM\n\nEach failed once and ran again; the retry is among the runs (or the failures).\n\n| mode | shaping | evasion | busy | run | host | the first attempt |\n|---|---|---|---|---|---|---|"
        )?;
        for attempt in &inputs.retried {
            if let Some(cell) = inputs.matrix_cells.get(attempt.cell) {
                writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    md(&cell.mode),
                    md(&cell.shaping),
                    md(&cell.evasion),
                    cell.busy,
                    attempt.repeat + 1,
                    attempt.host,
                    md(&attempt.why)
                )?;
            }
        }
    }
    markdown_distributions(out, report)?;
    markdown_sweeps(out, report)?;
    markdown_roc(out, report)?;
    markdown_arms_race(out, report)
}

/// The detectors × evaders table, and under it each cell's evidence in one line.
fn markdown_arms_race(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    let race = &report.arms_race;
    if race.columns.len() < 2 {
        return Ok(());
    }
    let rules: Vec<&str> = columns(report)
        .into_iter()
        .filter(|r| race.cells.contains_key(*r))
        .collect();
    write!(
        out,
        "\n## Detectors × evaders\n\nWhat each rule made of each column (everything a set of cells stages, every path together) by the majority of its runs: **caught** (a VM called virtual), **fooled** (a VM called native), **false alarm** (a host called virtual), quiet (a host called native), unsure (more than half unsure), or not applicable (the run lacked what the rule reads); with the share of runs flagged virtual.\n\n| rule |"
    )?;
    for column in &race.columns {
        write!(out, " {} [{}] |", md(&column.arms), column.truth.name())?;
    }
    write!(out, "\n|---|")?;
    for _ in &race.columns {
        write!(out, "---|")?;
    }
    writeln!(out)?;
    for rule in &rules {
        write!(out, "| {} |", md(rule))?;
        for cell in &race.cells[*rule] {
            let text = match cell {
                Some(c) => {
                    let rate = f64::from(c.flagged) / f64::from(c.runs.max(1));
                    match c.outcome {
                        Outcome::Caught | Outcome::Fooled | Outcome::FalseAlarm => {
                            format!("**{}** {rate:.2}", c.outcome.name())
                        }
                        other => format!("{} {rate:.2}", other.name()),
                    }
                }
                None => "not applicable".into(),
            };
            write!(out, " {text} |")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "\n### The evidence, per column\n\nEach cell's rule in one line, from the first of its runs whose verdict is the cell's outcome.")?;
    for (c, column) in race.columns.iter().enumerate() {
        writeln!(
            out,
            "\n**{} [{}]**, {} runs:\n",
            md(&column.arms),
            column.truth.name(),
            column.runs
        )?;
        for rule in &rules {
            if let Some(Some(cell)) = race.cells[*rule].get(c) {
                writeln!(
                    out,
                    "- `{rule}`: {} ({} of {} flagged): {}",
                    cell.outcome.name(),
                    cell.flagged,
                    cell.runs,
                    md(&cell.evidence)
                )?;
            }
        }
    }
    Ok(())
}

fn markdown_roc(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    let Some(roc) = &report.roc else { return Ok(()) };
    writeln!(
        out,
        "\n## ROC per rule\n\nEach rule's threshold moved over its scores: {} against {}. AUC: the chance a run of the second side scores above one of the first (ties half).\n\n| rule | AUC | negatives | positives | its own threshold (FPR, TPR) |\n|---|---|---|---|---|",
        md(&roc.negatives),
        md(&roc.positives)
    )?;
    for (rule, r) in &roc.rules {
        writeln!(
            out,
            "| {} | {:.3} | {} | {} | {:.2}, {:.2} |",
            md(rule),
            r.auc,
            r.negatives,
            r.positives,
            r.operating[0],
            r.operating[1]
        )?;
    }
    Ok(())
}

fn markdown_sweeps(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    for sweep in &report.sweeps {
        writeln!(
            out,
            "\n## Sweep of {} on {} ({})\n\nShare of runs flagged virtual at each value, with its exact 95% interval.\n",
            md(&sweep.swept),
            md(&sweep.cells),
            sweep.truth.name()
        )?;
        let rules: Vec<&String> = sweep.rules.keys().collect();
        write!(out, "| {} |", md(&sweep.swept))?;
        for rule in &rules {
            write!(out, " {} |", md(rule))?;
        }
        write!(out, "\n|---|")?;
        for _ in &rules {
            write!(out, "---|")?;
        }
        writeln!(out)?;
        for value in &sweep.values {
            write!(out, "| {value} |")?;
            for rule in &rules {
                let point = sweep.rules[*rule].points.iter().find(|p| p.value == *value);
                let text = point.map_or("—".to_owned(), |p| rate(Some(p.rate), p.interval));
                write!(out, " {text} |")?;
            }
            writeln!(out)?;
        }
        writeln!(
            out,
            "\n| rule | flagged half the time | 95% of the time |\n|---|---|---|"
        )?;
        for rule in &rules {
            let curve = &sweep.rules[*rule];
            writeln!(
                out,
                "| {} | {} | {} |",
                md(rule),
                md(&crossing_text(&curve.half, curve.falls)),
                md(&crossing_text(&curve.most, curve.falls))
            )?;
        }
    }
    Ok(())
}

fn markdown_distributions(out: &mut String, report: &ValidationReport) -> std::fmt::Result {
    let probes = distributed_probes(report);
    if probes.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "\n## Each probe per cell, against native\n\nCycles pooled over the cell's runs (each run's sketch of 200 order statistics weighing the same), and the two-sample Kolmogorov–Smirnov distance to the native reference of the same probe (every native run, unshaped, unevaded, idle): 0 alike, 1 no overlap."
    )?;
    for probe in probes {
        writeln!(
            out,
            "\n### {probe}\n\n| mode | shaping | evasion | busy | truth | p50 | p95 | p99 | KS to native |\n|---|---|---|---|---|---|---|---|---|"
        )?;
        for cell in &report.cells {
            let Some(d) = cell.distributions.get(probe) else {
                continue;
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md(&cell.mode),
                md(&cell.shaping),
                md(&cell.evasion),
                cell.busy,
                cell.truth.name(),
                d.p50,
                d.p95,
                d.p99,
                d.ks_to_native.map_or("—".to_owned(), |ks| format!("{ks:.3}"))
            )?;
        }
    }
    Ok(())
}

fn arms_race_table(out: &mut String, report: &ValidationReport, rules: &[&'static str]) -> std::fmt::Result {
    let race = &report.arms_race;
    if race.columns.len() < 2 {
        return Ok(());
    }
    writeln!(
        out,
        "
detector × what the cells stage: share flagged virtual (sees: caught a VM; fooled: called a VM native or unsure; false+: called a host a VM; -: not judged there, for want of a counter vCPU, or code-integrity where the testbed's patch trapped CPUID for an evader that patches nothing):"
    )?;
    write!(out, "{:<19}", "rule")?;
    for column in &race.columns {
        write!(out, " {:>22}", format!("{} [{}]", t(&column.arms), column.truth.name()))?;
    }
    writeln!(out)?;
    for rule in rules {
        let Some(rates) = race.rules.get(*rule) else { continue };
        write!(out, "{rule:<19}")?;
        for (column, rate) in race.columns.iter().zip(rates) {
            let text = match (rate, column.truth) {
                (None, _) => "-".to_string(),
                (Some(r), Verdict::Virtual) => format!("{r:.2} {}", if *r >= 0.5 { "sees" } else { "fooled" }),
                (Some(r), _) => format!("{r:.2} {}", if *r >= 0.5 { "false+" } else { "ok" }),
            };
            write!(out, " {text:>22}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            // Not characters XML 1.0 allows.
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// One test case per cell × rule (failed when any run's verdict is not the cell's truth),
/// a skipped one per refused cell, an error per cell with failed runs, and one per
/// requirement.
pub fn junit(report: &ValidationReport) -> Result<String, RenderError> {
    write_junit(report).map_err(RenderError::Junit)
}

fn write_junit(report: &ValidationReport) -> Result<String, std::fmt::Error> {
    let mut cases = String::new();
    let (mut tests, mut failures, mut errors, mut skipped) = (0, 0, 0, 0);
    let mut case = |classname: &str, name: &str, body: Option<String>| -> std::fmt::Result {
        write!(
            cases,
            "    <testcase classname=\"{}\" name=\"{}\"",
            escape(classname),
            escape(name)
        )?;
        match body {
            None => cases.push_str("/>\n"),
            Some(body) => writeln!(cases, ">\n      {body}\n    </testcase>")?,
        }
        Ok(())
    };
    for cell in &report.cells {
        let class = cell_class(cell);
        if let Some(why) = &cell.refused {
            tests += 1;
            skipped += 1;
            case(
                &class,
                "cell",
                Some(format!("<skipped message=\"refused: {}\"/>", escape(why))),
            )?;
            continue;
        }
        if cell.failed_runs > 0 {
            tests += 1;
            errors += 1;
            let message = format!(
                "{} of the cell's runs failed (see the report's failures)",
                cell.failed_runs
            );
            case(
                &class,
                "runs",
                Some(format!("<error message=\"{}\"/>", escape(&message))),
            )?;
        }
        for (rule, result) in &cell.rules {
            tests += 1;
            let counts = result.counts;
            let right = match cell.truth {
                Verdict::Native => counts.native,
                _ => counts.virtual_,
            };
            let flagged = format!(
                "flagged virtual in {} of {} runs: {}",
                counts.virtual_,
                counts.total(),
                rate(Some(result.flagged_rate), result.flagged_interval)
            );
            if right == counts.total() {
                case(
                    &class,
                    rule,
                    Some(format!(
                        "<system-out>{} (exact 95% interval)</system-out>",
                        escape(&flagged)
                    )),
                )?;
            } else {
                failures += 1;
                let message = format!(
                    "{right} of {} runs judged {} (truth): {} virtual, {} native, {} unsure; {flagged}",
                    counts.total(),
                    cell.truth.name(),
                    counts.virtual_,
                    counts.native,
                    counts.unsure
                );
                case(
                    &class,
                    rule,
                    Some(format!("<failure message=\"{}\"/>", escape(&message))),
                )?;
            }
        }
    }
    if report.matrix_coverage.missing > 0 {
        tests += 1;
        failures += 1;
        let c = &report.matrix_coverage;
        let message = format!(
            "{} of {} jobs missing (shards not given: {})",
            c.missing,
            c.jobs,
            if c.missing_shards.is_empty() {
                "none".to_owned()
            } else {
                c.missing_shards_text()
            }
        );
        case(
            "coverage",
            "matrix",
            Some(format!("<failure message=\"{}\"/>", escape(&message))),
        )?;
    }
    for result in &report.requirements {
        tests += 1;
        if result.met {
            let caveat = result.unsupported.as_ref().map(|caveat| {
                format!(
                    "<system-out>holds on the point estimate only: {}</system-out>",
                    escape(caveat)
                )
            });
            case("requirements", &result.requirement, caveat)?;
        } else {
            failures += 1;
            case(
                "requirements",
                &result.requirement,
                Some(format!("<failure message=\"{}\"/>", escape(&result.why))),
            )?;
        }
    }
    Ok(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"vmm validate {}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\">\n{cases}  </testsuite>\n</testsuites>\n",
        escape(&report.inputs.config)
    ))
}

fn cell_class(cell: &CellResult) -> String {
    format!(
        "{} | {} | busy {} | truth {}",
        cell.mode,
        cell.shaping,
        cell.busy,
        cell.truth.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_text_is_escaped() {
        assert_eq!(escape("a<b & \"c\"\u{1b}"), "a&lt;b &amp; &quot;c&quot;\\u{1b}");
        assert_eq!(escape("one\ntwo\u{fffe}"), "one&#10;two\\u{fffe}");
    }
}
