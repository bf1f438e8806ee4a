//! `vmm run`: one run, in one mode, reported as a table or JSON, optionally CSV and SVG.

use super::{create_output, load_calibration, load_payload, CommandError};
use crate::cli::{Misbehaviour, RunArgs, ShapingArgs};
use crate::experiment::Session;
use crate::measure::RunSpec;
use crate::modes::Path;
use crate::report::{self, plot};
use crate::shaping::latency::Shaping;
use crate::shaping::plan;
use crate::shaping::profile::Profile;
use std::io::Write;
use std::time::Duration;

pub fn run(args: &RunArgs) -> Result<(), CommandError> {
    let payload = load_payload(args.payload.as_deref())?;
    let calibration = load_calibration(args.detector.calibration.as_deref())?;
    // Refuse unwritable output paths before measuring, not after.
    let csv_file = create_output(args.output.csv.as_deref())?;
    let plot_file = create_output(args.output.plot.as_deref())?;
    let session = Session::open(payload, calibration);
    let spec = RunSpec {
        shaping: shaping(&args.shaping, session.tsc.khz)?,
        iterations: args.iterations,
        warmup: args.warmup,
        cpuid_leaf: args.leaf,
        cpuid_subleaf: args.subleaf,
        probes: match args.probes.as_slice() {
            [] => crate::measure::default_probes(args.vcpus == 2),
            probes => probes
                .iter()
                .map(|&p| guest_payload::Probe::from(p).bit())
                .fold(0, |a, b| a | b),
        },
        counter: args.vcpus == 2,
        evasions: crate::shaping::registry::Evasions::parse(args.evade.iter().map(String::as_str))
            .map_err(crate::measure::MeasureError::from)?,
        tsc_trap: args.tsc_trap,
        guest_flags: match args.misbehave {
            Some(Misbehaviour::Hang) => guest_payload::flags::HANG,
            Some(Misbehaviour::Fault) => guest_payload::flags::FAULT,
            Some(Misbehaviour::Mmio) => guest_payload::flags::STRAY_MMIO,
            Some(Misbehaviour::Port) => guest_payload::flags::STRAY_PORT,
            None => 0,
        },
        timeout: Duration::from_secs_f64(args.timeout),
        cpu: args.cpu,
        busy: usize::from(args.detector.busy),
        ..RunSpec::new(Path::new(args.mode, args.trap))
    };
    // The guest's console, written to stderr without blocking: a terminal that does not
    // keep up costs bytes (counted), never time past the run's deadline.
    let mut terminal = args.output.console.then(crate::console::Console::stderr);
    let console = terminal.as_mut().map(|c| c as &mut (dyn Write + Send));
    let result = session.run(&spec, args.output.raw, console);
    if let Some(dropped) = terminal.map(crate::console::Console::finish).filter(|&n| n > 0) {
        crate::console::say(&format!(
            "vmm: {dropped} console bytes were dropped: stderr did not keep up with the guest\n"
        ));
    }
    let (mut report, measurement) = result?;
    if args.samples_to_decision {
        report.samples_to_decision = session.samples_to_decision(&spec, &measurement, &report);
    }

    if args.output.json {
        super::print(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        super::print(&report::table::render(&report))?;
    }
    if let Some(output) = csv_file {
        let mut csv = Vec::new();
        report::csv::write(&mut csv, &measurement.results.samples).map_err(|source| CommandError::Output {
            path: output.path().display().to_string(),
            source,
        })?;
        super::commit(output, &csv)?;
    }
    if let Some(output) = plot_file {
        let runs = [plot::PlotRun::new(
            report.path.name(),
            &measurement.results.samples,
            report.host.tsc_khz,
        )];
        plot::write(output, &runs, &session.calibration)?;
    }
    Ok(())
}

/// The shaping the options ask for; --inject-ns is converted at the run's TSC rate.
pub fn shaping(args: &ShapingArgs, tsc_khz: u32) -> Result<Shaping, CommandError> {
    Ok(if let Some(ns) = args.inject_ns {
        Shaping::Inject {
            cycles: plan::ns_to_cycles(ns, tsc_khz),
        }
    } else if let Some(cycles) = args.inject_cycles {
        Shaping::Inject { cycles }
    } else if let Some(cycles) = args.virtual_inject_cycles {
        Shaping::VirtualInject { cycles }
    } else if args.hide {
        Shaping::Hide {
            target: args.target_cycles,
        }
    } else if let Some(profile) = &args.profile {
        Shaping::Profile {
            profile: Box::new(Profile::load(profile)?),
            seed: args.seed,
        }
    } else {
        Shaping::None
    })
}
