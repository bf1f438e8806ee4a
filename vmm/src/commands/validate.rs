//! `vmm validate`: every cell of the matrix, repeated, every rule scored against the
//! cell's ground truth.

use super::calibrate::progress_bar;
use super::{create_output, load_calibration, load_payload, CommandError};
use crate::cli::ValidateArgs;
use crate::experiment::Session;
use crate::measure::RunSpec;
use crate::report::plot;
use crate::validation::{ground_truth, render_markdown, render_table, CellAccumulator, MatrixConfig, ValidationReport};
use guest_payload::Probe;
use std::io::Write;

pub fn validate(args: &ValidateArgs) -> Result<(), CommandError> {
    let config = MatrixConfig::load(&args.config)?;
    let calibration = load_calibration(args.calibration.as_deref())?;
    let markdown_file = create_output(args.markdown.as_deref())?;
    let plot_file = create_output(args.plot.as_deref())?;
    let session = Session::open(load_payload(args.payload.as_deref())?, calibration);
    let cells = config.cells(session.tsc.khz, &args.config)?;
    let host_is_vm = session.host.is_vm;

    let progress = progress_bar(cells.len() as u64 * u64::from(config.repeats), "validating");
    let mut results = Vec::with_capacity(cells.len());
    let mut plot_runs = Vec::new();
    for cell in &cells {
        let spec = RunSpec {
            shaping: cell.shaping.clone(),
            iterations: config.iterations,
            warmup: config.warmup,
            busy: usize::from(cell.busy),
            ..RunSpec::new(cell.path)
        };
        let mut accumulator = CellAccumulator::new(ground_truth(cell.path.mode(), host_is_vm));
        let (mut refused, mut failed) = (None, 0);
        for repeat in 0..config.repeats {
            match session.run(&spec, false, None) {
                Ok((report, measurement)) => {
                    let median = |p: Probe| report.probes.get(p.name()).map(|s| s.cycles.median);
                    accumulator.add(&report.verdicts, median(Probe::Cpuid), median(Probe::Nop));
                    plot_runs.push(plot::PlotRun::new(
                        cell.path.name(),
                        &measurement.samples,
                        report.host.tsc_khz,
                    ));
                    progress.inc(1);
                }
                // Refused before anything ran (a capability this host lacks): the cell is
                // reported as refused and its other repeats are not attempted.
                Err(error) if repeat == 0 && error.is_refusal() => {
                    refused = Some(error.to_string());
                    progress.inc(u64::from(config.repeats));
                    break;
                }
                Err(error) => {
                    progress.suspend(|| eprintln!("vmm: {}: run {} failed: {error}", cell.label(), repeat + 1));
                    failed += 1;
                    progress.inc(1);
                }
            }
        }
        results.push(accumulator.finish(cell, refused, failed));
    }
    progress.finish_and_clear();

    let report = ValidationReport {
        schema_version: crate::report::SCHEMA_VERSION,
        config: args.config.display().to_string(),
        description: config.description.clone(),
        payload: session.payload.describe(),
        host: serde_json::to_value(&session.host)?,
        host_is_vm,
        native_truth: if host_is_vm {
            "virtual: the host is itself a VM (CPUID.1:ECX[31]), so its native runs are virtualised".into()
        } else {
            "native: the host runs on bare metal".into()
        },
        calibrated: session.calibration.calibrated,
        repeats: config.repeats,
        iterations: config.iterations,
        confusion: ValidationReport::confusion_of(&results),
        cells: results,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_table(&report));
    }
    if let (Some(mut file), Some(path)) = (markdown_file, &args.markdown) {
        file.write_all(render_markdown(&report).as_bytes())
            .map_err(|source| CommandError::Output {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let (Some(file), Some(path)) = (plot_file, &args.plot) {
        plot::write(file, path, &plot_runs, &session.calibration)?;
    }
    Ok(())
}
