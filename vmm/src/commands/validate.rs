//! `vmm validate`: every cell of the matrix (or a shard's slice of it), repeated, every rule
//! scored against the cell's ground truth; `vmm merge`: shard and host reports as one.
//! Both can gate CI (`--require`) and write JUnit.

use super::calibrate::progress_bar;
use super::{create_output, load_calibration, load_payload, CommandError};
use crate::cli::{MergeArgs, ReportArgs, ValidateArgs};
use crate::experiment::Session;
use crate::measure::RunSpec;
use crate::output::Output;
use crate::report::plot;
use crate::validation::records::{
    CellSpec, Failure, HostIdentity, HostRecord, Refusal, RunRecord, Stop, ValidationInputs,
};
use crate::validation::requirements::Requirement;
use crate::validation::{figures, render};
use crate::validation::{merge, MatrixConfig, Shard, ValidationReport};

/// The report's outputs, prepared before anything runs so a bad path costs no run, and
/// put in place only once written whole (the previous ones stay until then).
struct Outputs {
    markdown: Option<Output>,
    plot: Option<Output>,
    roc_plot: Option<Output>,
    sweep_plot: Option<Output>,
    matrix_plot: Option<Output>,
    junit: Option<Output>,
    json: Option<Output>,
    /// `merge --allow-partial`.
    allow_partial: bool,
}

impl Outputs {
    fn create(args: &ReportArgs) -> Result<Self, CommandError> {
        Ok(Self {
            markdown: create_output(args.markdown.as_deref())?,
            plot: create_output(args.plot.as_deref())?,
            roc_plot: create_output(args.roc_plot.as_deref())?,
            sweep_plot: create_output(args.sweep_plot.as_deref())?,
            matrix_plot: create_output(args.matrix_plot.as_deref())?,
            junit: create_output(args.junit.as_deref())?,
            json: create_output(args.output.as_deref())?,
            allow_partial: false,
        })
    }

    /// Prints and writes `report`, then fails if a run failed or a requirement is unmet.
    fn finish(
        self,
        report: &ValidationReport,
        print_json: bool,
        calibration: &crate::detector::Calibration,
        merged: bool,
    ) -> Result<(), CommandError> {
        let partial_fails = merged && !self.allow_partial;
        if print_json {
            super::print(&(serde_json::to_string_pretty(report)? + "\n"))?;
        } else {
            super::print(&render::table(report)?)?;
        }
        let write = |output: Option<Output>, text: String| -> Result<(), CommandError> {
            output.map_or(Ok(()), |output| super::commit(output, text.as_bytes()))
        };
        let mut markdown = render::markdown(report)?;
        let figures = [
            ("ROC per rule", self.roc_plot.as_ref(), report.roc.is_some()),
            (
                "Detection curves of each sweep",
                self.sweep_plot.as_ref(),
                !report.sweeps.is_empty(),
            ),
            (
                "Detectors × evaders",
                self.matrix_plot.as_ref(),
                report.arms_race.columns.len() >= 2,
            ),
        ];
        if let Some(md) = &self.markdown {
            let linked: Vec<String> = figures
                .iter()
                .filter(|(_, output, drawn)| *drawn && output.is_some())
                .filter_map(|(title, output, _)| Some(format!("![{title}]({})", figure_link(md, (*output)?))))
                .collect();
            if !linked.is_empty() {
                markdown.push_str(&format!("\n## Figures\n\n{}\n", linked.join("\n\n")));
            }
        }
        write(self.markdown, markdown)?;
        write(self.junit, render::junit(report)?)?;
        write(self.json, serde_json::to_string_pretty(report)?)?;
        if let Some(output) = self.plot {
            plot::write(output, &report.plot_runs(), calibration)?;
        }
        let mut nothing_to_draw: Option<CommandError> = None;
        match (self.roc_plot, &report.roc) {
            (Some(output), Some(roc)) => write(Some(output), figures::roc_svg(roc).map_err(figure_error)?)?,
            (Some(_), None) => {
                nothing_to_draw = Some(CommandError::NothingToDraw {
                    option: "--roc-plot",
                    why: "the matrix has no native runs (every host is a VM) and no sweep to put its lowest value against its highest",
                })
            }
            (None, _) => {}
        }
        match self.matrix_plot {
            Some(output) if report.arms_race.columns.len() >= 2 => {
                let rules = crate::detector::rule_columns(report.confusion.keys().map(String::as_str));
                write(
                    Some(output),
                    figures::arms_race_svg(&report.arms_race, &rules).map_err(figure_error)?,
                )?
            }
            Some(_) => {
                if let Some(other) = nothing_to_draw.take() {
                    crate::console::say(&format!("vmm: error: {other}\n"));
                }
                nothing_to_draw = Some(CommandError::NothingToDraw {
                    option: "--matrix-plot",
                    why: "the matrix stages one thing only (a single shaping and evasion): no columns to put side by side",
                });
            }
            None => {}
        }
        match self.sweep_plot {
            Some(output) if !report.sweeps.is_empty() => {
                write(Some(output), figures::sweeps_svg(&report.sweeps).map_err(figure_error)?)?
            }
            Some(_) => {
                // Both plots empty: both said, one error.
                if let Some(roc) = nothing_to_draw.take() {
                    crate::console::say(&format!("vmm: error: {roc}\n"));
                }
                nothing_to_draw = Some(CommandError::NothingToDraw {
                    option: "--sweep-plot",
                    why: "the matrix has no sweep (a value written KIND:FROM..TO/STEP, three values at least)",
                });
            }
            None => {}
        }
        if let Some(why) = &report.inputs.interrupted {
            // A merge read an interrupted report; it was not interrupted itself.
            if merged {
                return Err(CommandError::InputInterrupted(why.clone()));
            }
            return Err(CommandError::Interrupted {
                signal: report.inputs.interrupted_by.unwrap_or(libc::SIGINT),
                done: format!("{why}; the report of what finished is written, marked partial"),
            });
        }
        if !report.inputs.failures.is_empty() {
            let cells: std::collections::BTreeSet<String> = report
                .inputs
                .failures
                .iter()
                .filter_map(|f| report.inputs.matrix_cells.get(f.cell))
                .map(|c| format!("{} | {} | busy {}", c.mode, c.shaping, c.busy))
                .collect();
            return Err(CommandError::RunsFailed {
                runs: report.inputs.failures.len(),
                cells: cells.into_iter().collect::<Vec<_>>().join("; "),
            });
        }
        for r in report.requirements.iter().filter(|r| r.met) {
            if let Some(caveat) = &r.unsupported {
                crate::console::say(&format!(
                    "vmm: warning: the requirement {} holds on the point estimate only: {caveat}\n",
                    r.requirement
                ));
            }
        }
        let unmet = report.unmet_requirements();
        if !unmet.is_empty() {
            return Err(CommandError::RequirementsUnmet(
                unmet.iter().map(|r| r.why.clone()).collect::<Vec<_>>().join("; "),
            ));
        }
        let coverage = &report.matrix_coverage;
        if partial_fails && coverage.missing > 0 {
            return Err(CommandError::Partial {
                missing: coverage.missing,
                jobs: coverage.jobs,
                shards: if coverage.missing_shards.is_empty() {
                    String::new()
                } else {
                    format!(" (shards not given: {})", coverage.missing_shards_text())
                },
            });
        }
        nothing_to_draw.map_or(Ok(()), Err)
    }
}

/// One run's whole report, samples included, as DIR/NNN-label/run-R.json (`--evidence`).
fn keep_evidence(
    dir: &std::path::Path,
    cell: usize,
    label: &str,
    repeat: u32,
    report: &crate::report::RunReport,
) -> Result<(), CommandError> {
    // The cell's label as a file name: "trap-emulate:io-patch | none | busy 0" becomes
    // trap-emulate_io-patch_none_busy_0 (no separators, nothing to quote in a shell).
    let mut name = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with('_') {
            name.push('_');
        }
    }
    let name = name.trim_end_matches('_');
    let cell_dir = dir.join(format!("{cell:03}-{name}"));
    let path = cell_dir.join(format!("run-{}.json", repeat + 1));
    let output = |source| CommandError::Output {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&cell_dir).map_err(output)?;
    std::fs::write(&path, serde_json::to_vec_pretty(report)?).map_err(output)
}

/// Each rule's flagged count over `runs` (of one cell).
fn flagged_counts(runs: &[RunRecord]) -> std::collections::BTreeMap<&str, (u32, u32)> {
    let mut counts: std::collections::BTreeMap<&str, (u32, u32)> = std::collections::BTreeMap::new();
    for run in runs {
        for v in &run.verdicts {
            let c = counts.entry(v.rule.as_str()).or_default();
            c.0 += u32::from(v.verdict == crate::detector::Verdict::Virtual);
            c.1 += 1;
        }
    }
    counts
}

/// The widest exact 95% interval of a rule's flagged rate over `runs`: (rule, width).
fn widest_interval(runs: &[RunRecord]) -> Option<(String, f64)> {
    flagged_counts(runs)
        .into_iter()
        .filter_map(|(rule, (flagged, of))| {
            let i = crate::stats::proportion_interval(flagged, of)?;
            Some((rule.to_owned(), i.upper - i.lower))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Why `runs` are enough: every rule's interval at most `width` wide; `None` if not yet.
fn precise_enough(runs: &[RunRecord], width: f64) -> Option<String> {
    let (rule, widest) = widest_interval(runs)?;
    (widest <= width).then(|| {
        format!(
            "stopped after {} runs: every rule's 95% interval at most {width} wide (the widest, {rule}'s, {widest:.3})",
            runs.len()
        )
    })
}

/// Why `runs`, all of the bound, were not enough.
fn widest(runs: &[RunRecord], width: f64) -> String {
    let (rule, widest) = widest_interval(runs).unwrap_or_default();
    format!(
        "the bound of {} runs was reached first: {rule}'s 95% interval is still {widest:.3} wide, more than {width}",
        runs.len()
    )
}

fn requirements(texts: &[String]) -> Result<Vec<Requirement>, CommandError> {
    texts
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|why| CommandError::Requirement(format!("--require `{text}`: {why}")))
        })
        .collect()
}

pub fn validate(args: &ValidateArgs) -> Result<(), CommandError> {
    let mut config = MatrixConfig::load(&args.config)?;
    if let Some(width) = args.precision {
        config.precision = Some(width);
    }
    if let Some(bound) = args.max_repeats {
        if config.precision.is_none() {
            return Err(CommandError::Validation(crate::validation::ValidationError::Invalid {
                path: args.config.clone(),
                why:
                    "--max-repeats bounds the runs of --precision, and neither it nor the matrix's `precision` is given"
                        .into(),
            }));
        }
        config.repeats = bound;
    }
    // Checked again as a whole: the options may have made it invalid.
    let config = MatrixConfig::parse(&serde_json::to_string(&config)?, &args.config)?;
    if let Some(width) = config.precision {
        // Runs that all agree are the narrowest: 1 - 0.025^(1/n) wide.
        let fewest = crate::stats::trials_to_support(1.0 - width);
        if u64::from(config.repeats) < fewest {
            crate::console::say(&format!(
                "vmm: warning: --precision {width} needs at least {fewest} runs a cell even where every run \
                 agrees, and the bound is {}: every cell will run to the bound. Raise --max-repeats\n",
                config.repeats
            ));
        }
    }
    let extra = requirements(&args.report.require)?;
    let shard = match &args.shard {
        Some(text) => text.parse::<Shard>().map_err(CommandError::Shard)?,
        None => Shard::WHOLE,
    };
    let calibration = load_calibration(args.calibration.as_deref())?;
    let outputs = Outputs::create(&args.report)?;
    let session = Session::open(load_payload(args.payload.as_deref())?, calibration);
    let cells = config.cells(session.tsc.khz, &args.config)?;
    let probes = config.probe_bits(&args.config)?;
    let host = HostIdentity::new(&session.host, session.calibration.calibrated);
    let repeats = config.repeats;
    let job = |cell: usize, repeat: u32| cell as u64 * u64::from(repeats) + u64::from(repeat);
    let jobs: u64 = (0..cells.len())
        .flat_map(|c| (0..repeats).map(move |r| (c, r)))
        .filter(|&(c, r)| shard.takes(job(c, r)))
        .count() as u64;

    let progress = progress_bar(jobs, "validating");
    let (mut runs, mut refusals, mut failures) = (Vec::new(), Vec::new(), Vec::<Failure>::new());
    let mut retried = Vec::<Failure>::new();
    let mut stops: Vec<Stop> = Vec::new();
    crate::interrupt::catch();
    let mut done = 0u64;
    let mut missing_twin: Option<String> = None;
    // --evidence keeps each run's samples: the runs must report them.
    let raw = args.evidence.is_some();
    'cells: for (index, cell) in cells.iter().enumerate() {
        let spec = RunSpec {
            shaping: cell.shaping.clone(),
            iterations: config.iterations,
            warmup: config.warmup,
            busy: usize::from(cell.busy),
            counter: config.vcpus == 2,
            evasions: cell.evasions.clone(),
            probes,
            ..RunSpec::new(cell.path)
        };
        let truth = cell.truth(host.host_is_vm);
        let mine: Vec<u32> = (0..repeats).filter(|&r| shard.takes(job(index, r))).collect();
        let first_run = runs.len();
        for (nth, &repeat) in mine.iter().enumerate() {
            if crate::interrupt::caught().is_some() {
                break 'cells;
            }
            if let Some(width) = config.precision {
                if let Some(why) = precise_enough(&runs[first_run..], width) {
                    let left = (mine.len() - nth) as u32;
                    stops.push(Stop {
                        cell: index,
                        host: 0,
                        shard,
                        jobs: left,
                        runs: (runs.len() - first_run) as u32,
                        reached: true,
                        why,
                    });
                    progress.inc(u64::from(left));
                    done += u64::from(left);
                    continue 'cells;
                }
            }
            done += 1;
            // A run that fails (a guest that hung, a KVM that stopped it) is retried once
            // in a fresh VM; the failed attempt is kept in the report as retried.
            let mut outcome = session.run(&spec, raw, None);
            if let Err(error) = &outcome {
                if !(nth == 0 && error.is_refusal()) {
                    progress.suspend(|| {
                        eprintln!(
                            "vmm: {}: run {} failed ({error}); retrying it in a fresh VM",
                            cell.label(),
                            repeat + 1
                        )
                    });
                    retried.push(Failure {
                        cell: index,
                        repeat,
                        host: 0,
                        why: error.to_string(),
                    });
                    outcome = session.run(&spec, raw, None);
                }
            }
            match outcome {
                Ok((report, measurement)) => {
                    if let Some(dir) = &args.evidence {
                        keep_evidence(dir, index, &cell.label(), repeat, &report)?;
                    }
                    runs.push(RunRecord::new(
                        (index, repeat, 0),
                        truth,
                        &report.verdicts,
                        &measurement.results.samples,
                        report.host.tsc_khz,
                    ));
                    progress.inc(1);
                }
                // Refused before anything ran (a capability this host or payload lacks):
                // the cell's other jobs in this shard are not attempted.
                Err(error) if nth == 0 && error.is_refusal() => {
                    if let crate::measure::MeasureError::NoNativeTwin { twin, .. } = &error {
                        missing_twin.get_or_insert_with(|| twin.clone());
                    }
                    refusals.push(Refusal {
                        cell: index,
                        host: 0,
                        jobs: mine.len() as u32,
                        why: crate::remedy::with_remedy(
                            error.to_string(),
                            error.remedy(),
                            crate::remedy::Remedy::matrix,
                        ),
                    });
                    progress.inc(mine.len() as u64);
                    done += mine.len() as u64 - 1;
                    break;
                }
                Err(error) => {
                    progress.suspend(|| eprintln!("vmm: {}: run {} failed: {error}", cell.label(), repeat + 1));
                    failures.push(Failure {
                        cell: index,
                        repeat,
                        host: 0,
                        why: crate::remedy::with_remedy(
                            error.to_string(),
                            error.remedy(),
                            crate::remedy::Remedy::matrix,
                        ),
                    });
                    progress.inc(1);
                }
            }
        }
        // Every job of the cell ran (none was refused): did it reach the precision?
        if let Some(width) = config.precision {
            let ran = &runs[first_run..];
            let refused = refusals.last().is_some_and(|r: &Refusal| r.cell == index);
            if !ran.is_empty() && !refused {
                let reached = precise_enough(ran, width);
                stops.push(Stop {
                    cell: index,
                    host: 0,
                    shard,
                    jobs: 0,
                    runs: ran.len() as u32,
                    reached: reached.is_some(),
                    why: reached.unwrap_or_else(|| widest(ran, width)),
                });
            }
        }
    }
    progress.finish_and_clear();
    if let Some(dir) = &args.evidence {
        crate::console::say(&format!(
            "vmm: every run's report, its samples included, is in {}/ (a directory per cell, run-R.json per run)\n",
            dir.display()
        ));
    }
    let interrupted_by = crate::interrupt::caught();

    let inputs = ValidationInputs {
        interrupted: interrupted_by.map(|signal| {
            format!(
                "interrupted by {} after {done} of {jobs} jobs",
                crate::interrupt::name(signal)
            )
        }),
        interrupted_by,
        schema_version: crate::report::SCHEMA_VERSION,
        config: args.config.display().to_string(),
        matrix_cells: cells
            .iter()
            .map(|c| CellSpec {
                mode: c.path.to_string(),
                shaping: c.shaping_label.clone(),
                busy: c.busy,
                evasion: c.evasion_label.clone(),
                truth_host: c.truth_host,
            })
            .collect(),
        matrix: config,
        payload: session.payload.describe(),
        payload_digest: session.payload.digest(),
        hosts: vec![HostRecord {
            identity: host,
            shards: vec![shard],
        }],
        runs,
        refusals,
        failures,
        retried,
        stops,
    };
    let report = ValidationReport::assemble(inputs, &extra);
    // A shard's report covers its slice by design: it is the merge that must be whole.
    outputs.finish(&report, args.report.json, &session.calibration, false)?;
    match missing_twin {
        Some(twin) if !args.allow_missing_twin => Err(CommandError::MissingTwin(twin)),
        _ => Ok(()),
    }
}

/// How the Markdown at `markdown` links the figure at `figure`: by its name where both
/// are in one folder, else by the path as given.
fn figure_link(markdown: &Output, figure: &Output) -> String {
    let (md, svg) = (markdown.path(), figure.path());
    match (md.parent(), svg.parent(), svg.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().into_owned(),
        // Elsewhere: absolute, as a viewer resolves a relative link from the Markdown's
        // folder, not from where vmm ran.
        _ => std::env::current_dir()
            .map(|dir| dir.join(svg))
            .unwrap_or_else(|_| svg.to_owned())
            .display()
            .to_string(),
    }
}

fn figure_error(why: String) -> CommandError {
    CommandError::Output {
        path: "the figure".into(),
        source: std::io::Error::other(why),
    }
}

pub fn merge(args: &MergeArgs) -> Result<(), CommandError> {
    let extra = requirements(&args.report.require)?;
    let outputs = Outputs {
        allow_partial: args.allow_partial,
        ..Outputs::create(&args.report)?
    };
    // Sizes first: nothing is parsed of a merge larger than it may read.
    merge::check_sizes(&args.reports)?;
    let mut reports = Vec::with_capacity(args.reports.len());
    for path in &args.reports {
        reports.push((path.clone(), merge::read(path)?));
    }
    let report = ValidationReport::assemble(merge::merge(reports)?, &extra);
    // Plots of merged reports draw each run's sketch; the rules' lines are the defaults'.
    outputs.finish(
        &report,
        args.report.json,
        &crate::detector::Calibration::uncalibrated(),
        true,
    )
}
