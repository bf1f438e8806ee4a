//! The subcommands, as library functions: `main.rs` only parses and dispatches.

pub mod calibrate;
pub mod compare;
pub mod inspect;
pub mod run;
pub mod trace;
pub mod validate;

use crate::detector::calibration::CalibrationError;
use crate::detector::Calibration;
use crate::measure::MeasureError;
use crate::output::Output;
use crate::shaping::profile::ProfileError;
use crate::validation::ValidationError;
use crate::vm::loader::{LoaderError, Payload};
use std::path::Path;

/// A refusal's message as the command line words it: its remedy spelt as a flag.
pub fn cli_message(error: &MeasureError) -> String {
    crate::remedy::with_remedy(error.to_string(), error.remedy(), |r| Some(r.flag()))
}

impl CommandError {
    /// The message `vmm` prints: a refused run's remedy spelt as a flag.
    pub fn cli_message(&self) -> String {
        match self {
            CommandError::Measure(error) => cli_message(error),
            other => other.to_string(),
        }
    }

    /// The process's exit status for this error: 128 + the signal for an interruption (as
    /// a shell reports it), 1 for everything else.
    pub fn exit_status(&self) -> u8 {
        match self {
            CommandError::Interrupted { signal, .. } => 128u8.saturating_add(u8::try_from(*signal).unwrap_or(0)),
            _ => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error(transparent)]
    Payload(#[from] LoaderError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error("cannot write {path}: {source}")]
    Output { path: String, source: std::io::Error },
    #[error("{option}: nothing to draw, {why}; nothing was written there (the other outputs were)")]
    NothingToDraw { option: &'static str, why: &'static str },
    #[error(transparent)]
    Plot(#[from] crate::report::plot::PlotError),
    #[error(transparent)]
    Render(#[from] crate::validation::render::RenderError),
    #[error("cannot encode the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("doctor found a problem that stops vmm from running guests")]
    DoctorFailed,
    #[error("every mode was refused on this host; nothing was measured")]
    NothingMeasured,
    #[error("{0}")]
    Requirement(String),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    #[error("--shard: {0}")]
    Shard(String),
    #[error("{runs} run(s) failed, in: {cells} (the report keeps every other run)")]
    RunsFailed { runs: usize, cells: String },
    #[error("unmet requirements: {0}")]
    RequirementsUnmet(String),
    #[error("the merge is PARTIAL: {missing} of {jobs} jobs missing{shards}; the report is written, marked partial. Give every shard's report, or pass --allow-partial to accept it")]
    Partial { missing: u64, jobs: u64, shards: String },
    #[error("the payload's native twin {0} is missing, so its native cells were refused (the report is written): build the twin, or pass --allow-missing-twin to accept a matrix without native runs")]
    MissingTwin(String),
    #[error("interrupted by {}: {done}", crate::interrupt::name(*.signal))]
    Interrupted { signal: i32, done: String },
    #[error("an input report was interrupted: {0}; the merged report is written, marked partial")]
    InputInterrupted(String),
}

/// The calibration at `path`, or the documented defaults.
pub fn load_calibration(path: Option<&Path>) -> Result<Calibration, CommandError> {
    Ok(match path {
        Some(path) => Calibration::load(path)?,
        None => Calibration::uncalibrated(),
    })
}

/// The payload at `path`, or the embedded timing core.
pub fn load_payload(path: Option<&Path>) -> Result<Payload, CommandError> {
    Ok(match path {
        Some(path) => Payload::from_file(path)?,
        None => Payload::embedded()?,
    })
}

/// Claims an output before anything is measured, so that a bad path — a directory, one
/// that cannot be written, the same file as another output — costs no run; nothing is
/// written until the output is committed (`crate::output`).
pub fn create_output(path: Option<&Path>) -> Result<Option<Output>, CommandError> {
    path.map(|path| {
        Output::create(path).map_err(|source| CommandError::Output {
            path: path.display().to_string(),
            source,
        })
    })
    .transpose()
}

/// Prints `text` to stdout, an error (not a panic) when stdout is closed or full: the
/// measurement is done, and a reader that went away must not turn it into a crash.
pub fn print(text: &str) -> Result<(), CommandError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(CommandError::Stdout)
}

/// Writes a prepared output in place.
pub fn commit(output: Output, bytes: &[u8]) -> Result<(), CommandError> {
    let path = output.path().display().to_string();
    output
        .commit(bytes)
        .map_err(|source| CommandError::Output { path, source })
}
