//! The `vmm` command.

use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use vmm::cli::{Cli, Command, Misbehaviour, RunArgs, ShapingArgs};
use vmm::measure::{self, MeasureError, RunSpec};
use vmm::modes::Mode;
use vmm::report::{self, HostReport, RunReport};
use vmm::shaping::profile::{Profile, ProfileError};
use vmm::shaping::{plan, Shaping};
use vmm::vm::loader::{LoaderError, Payload};
use vmm::{doctor, host};

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error(transparent)]
    Payload(#[from] LoaderError),
    #[error("cannot write {path}: {source}")]
    Output { path: String, source: std::io::Error },
    #[error("cannot encode the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("doctor found a problem that stops vmm from running guests")]
    DoctorFailed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Doctor(args) => doctor_command(args.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vmm: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> Result<(), CliError> {
    let payload = match &args.payload {
        Some(path) => Payload::from_file(path)?,
        None => Payload::embedded()?,
    };
    // Refuse an unwritable CSV path before measuring, not after.
    let csv_file = match &args.output.csv {
        Some(path) => Some(std::fs::File::create(path).map_err(|source| CliError::Output {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    let kvm = match args.mode {
        Mode::Native => measure::open_kvm().ok(),
        _ => Some(measure::open_kvm()?),
    };
    let tsc = host::tsc_frequency(kvm.as_ref().and_then(measure::kvm_tsc_khz));
    let spec = RunSpec {
        mode: args.mode,
        trap: args.trap,
        shaping: shaping(&args.shaping, tsc.khz)?,
        iterations: args.iterations,
        warmup: args.warmup,
        cpuid_leaf: args.leaf,
        cpuid_subleaf: args.subleaf,
        probes: args
            .probes
            .iter()
            .map(|&p| guest_payload::Probe::from(p).bit())
            .fold(0, |a, b| a | b),
        guest_flags: match args.misbehave {
            Some(Misbehaviour::Hang) => guest_payload::flags::HANG,
            Some(Misbehaviour::Fault) => guest_payload::flags::FAULT,
            None => 0,
        },
        timeout: Duration::from_secs_f64(args.timeout),
        cpu: args.cpu,
        snapshot: true,
    };
    let mut stderr = std::io::stderr();
    let console: Option<&mut dyn Write> = if args.output.console { Some(&mut stderr) } else { None };
    let measurement = measure::measure(kvm.as_ref(), &payload, &spec, console)?;

    let kvm_khz = measurement
        .kvm_tsc_khz
        .or_else(|| kvm.as_ref().and_then(measure::kvm_tsc_khz));
    let host = HostReport::new(
        &host::cpu_info(),
        host::tsc_frequency(kvm_khz),
        kvm.as_ref().map(|k| k.get_api_version()),
    );
    let report = RunReport::new(&spec, &payload, host, &measurement, args.output.raw);
    if args.output.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::table::render(&report));
    }
    if let (Some(mut file), Some(path)) = (csv_file, &args.output.csv) {
        report::csv::write(&mut file, &measurement.samples).map_err(|source| CliError::Output {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

fn shaping(args: &ShapingArgs, tsc_khz: u32) -> Result<Shaping, CliError> {
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

fn doctor_command(json: bool) -> Result<(), CliError> {
    let checks = doctor::run_checks();
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", doctor::render(&checks));
    }
    if doctor::all_passed(&checks) {
        Ok(())
    } else {
        Err(CliError::DoctorFailed)
    }
}
