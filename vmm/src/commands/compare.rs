//! `vmm compare`: native and each VM mode back to back, side by side, with every rule's
//! verdict — the "next to real native runs" view.

use super::{create_output, load_calibration, load_payload, CommandError};
use crate::cli::CompareArgs;
use crate::detector::rule_columns;
use crate::experiment::Session;
use crate::host::HostInfo;
use crate::measure::RunSpec;
use crate::modes::Path;
use crate::report::{plot, RunReport};
use guest_payload::Probe;
use serde::Serialize;
use std::fmt::Write;
use std::time::Duration;

/// A short column label for each path.
fn label(path: Path) -> &'static str {
    match path {
        Path::Native => "native",
        Path::HwAssist => "hw-assist",
        Path::TrapEmulate(trap) => match trap {
            crate::modes::trap_emulate::Trap::HwBreakpoint => "trap:hw-bp",
            crate::modes::trap_emulate::Trap::Int3Patch => "trap:int3",
            crate::modes::trap_emulate::Trap::IoPatch => "trap:io",
        },
        Path::Paravirt => "paravirt",
    }
}

#[derive(Clone, Serialize)]
struct Refusal {
    path: &'static str,
    why: String,
}

#[derive(Serialize)]
struct CompareReport<'a> {
    schema_version: u32,
    host: &'a HostInfo,
    calibrated: bool,
    runs: Vec<&'a RunReport>,
    refused: Vec<Refusal>,
    /// Paths whose run failed (a hang, a fault): not refusals, and the command exits 1.
    failed: Vec<Refusal>,
    /// Interrupted (SIGINT, SIGTERM) before every path ran.
    partial: bool,
}

pub fn compare(args: &CompareArgs) -> Result<(), CommandError> {
    let calibration = load_calibration(args.detector.calibration.as_deref())?;
    let plot_file = create_output(args.plot.as_deref())?;
    let evasions = crate::shaping::registry::Evasions::parse(args.evade.iter().map(String::as_str))
        .map_err(crate::measure::MeasureError::from)?;
    let session = Session::open(load_payload(args.payload.as_deref())?, calibration);
    let mut columns = Vec::new();
    let (mut refused, mut failed) = (Vec::new(), Vec::new());
    let mut plot_runs = Vec::new();
    crate::interrupt::catch();
    let mut interrupted = None;
    for path in Path::ALL {
        if let Some(signal) = crate::interrupt::caught() {
            interrupted = Some(signal);
            break;
        }
        let label = label(path);
        let spec = RunSpec {
            iterations: args.iterations,
            warmup: args.warmup,
            timeout: Duration::from_secs_f64(args.timeout),
            busy: usize::from(args.detector.busy),
            evasions: if path == Path::Native {
                Default::default()
            } else {
                evasions.clone()
            },
            tsc_trap: if path == Path::Native {
                Default::default()
            } else {
                args.tsc_trap
            },
            ..RunSpec::new(path)
        };
        match session.run(&spec, false, None) {
            Ok((report, measurement)) => {
                plot_runs.push(plot::PlotRun::new(
                    label,
                    &measurement.results.samples,
                    report.host.tsc_khz,
                ));
                columns.push((label, report));
            }
            // A path this host cannot take is part of the comparison, not the end of it.
            Err(error) if error.is_refusal() => refused.push(Refusal {
                path: label,
                why: super::cli_message(&error),
            }),
            // Nor is a run that failed; it is said, and the command fails after the report.
            Err(error) => failed.push(Refusal {
                path: label,
                why: super::cli_message(&error),
            }),
        }
    }
    if columns.is_empty() && failed.is_empty() {
        return Err(match interrupted {
            Some(signal) => CommandError::Interrupted {
                signal,
                done: "nothing was measured".into(),
            },
            None => CommandError::NothingMeasured,
        });
    }
    if args.json {
        let report = CompareReport {
            schema_version: crate::report::SCHEMA_VERSION,
            host: &session.host,
            calibrated: session.calibration.calibrated,
            runs: columns.iter().map(|(_, r)| r).collect(),
            refused: refused.clone(),
            failed: failed.clone(),
            partial: interrupted.is_some(),
        };
        super::print(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        super::print(&render(
            &session.host,
            &columns,
            &refused,
            &failed,
            session.calibration.calibrated,
        ))?;
    }
    if let Some(output) = plot_file {
        plot::write(output, &plot_runs, &session.calibration)?;
    }
    if let Some(signal) = interrupted {
        return Err(CommandError::Interrupted {
            signal,
            done: format!(
                "{} of {} paths measured and reported (partial)",
                columns.len() + failed.len() + refused.len(),
                Path::ALL.len()
            ),
        });
    }
    if !failed.is_empty() {
        return Err(CommandError::RunsFailed {
            runs: failed.len(),
            cells: failed.iter().map(|f| f.path).collect::<Vec<_>>().join(", "),
        });
    }
    Ok(())
}

fn render(
    host: &HostInfo,
    columns: &[(&str, RunReport)],
    refused: &[Refusal],
    failed: &[Refusal],
    calibrated: bool,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "host: {} | KVM: {}{} | detector {}\n",
        host.cpu_model,
        host.kvm.flavour.describe(),
        if host.host_is_vm {
            " | the host is itself a VM"
        } else {
            ""
        },
        if calibrated {
            "calibrated"
        } else {
            "uncalibrated (defaults)"
        }
    );
    let _ = write!(out, "{:<28}", "median (cycles)");
    for (label, _) in columns {
        let _ = write!(out, " {label:>18}");
    }
    let _ = writeln!(out);
    for probe in Probe::ALL {
        let _ = write!(out, "{:<28}", probe.name());
        for (_, report) in columns {
            let cell = report
                .probes
                .get(probe.name())
                .map_or("—".to_owned(), |p| p.cycles.median.to_string());
            let _ = write!(out, " {cell:>18}");
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "{:<28}", "CPUID/NOP");
    for (_, report) in columns {
        let cell = report
            .cpuid_excess_over_nop
            .and_then(|e| e.ratio)
            .map_or("—".to_owned(), |ratio| format!("×{ratio:.2}"));
        let _ = write!(out, " {cell:>18}");
    }
    let _ = writeln!(out, "\n");
    let _ = write!(out, "{:<28}", "verdict (score)");
    for (label, _) in columns {
        let _ = write!(out, " {label:>18}");
    }
    let _ = writeln!(out);
    let rules = rule_columns(columns.iter().flat_map(|(_, r)| r.verdicts.iter().map(|v| v.rule)));
    for rule in rules {
        let _ = write!(out, "{rule:<28}");
        for (_, report) in columns {
            let cell = report
                .verdicts
                .iter()
                .find(|v| v.rule == rule)
                .map_or("—".to_owned(), |v| format!("{} ({:.2})", v.verdict.name(), v.score));
            let _ = write!(out, " {cell:>18}");
        }
        let _ = writeln!(out);
    }
    for refusal in refused {
        let _ = writeln!(out, "\n{}: refused — {}", refusal.path, refusal.why);
    }
    for failure in failed {
        let _ = writeln!(out, "\n{}: FAILED — {}", failure.path, failure.why);
    }
    out
}
