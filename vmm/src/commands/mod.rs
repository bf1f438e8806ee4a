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
use crate::shaping::profile::ProfileError;
use crate::validation::ValidationError;
use crate::vm::loader::{LoaderError, Payload};
use std::fs::File;
use std::path::Path;

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
    #[error("cannot draw {path}: {why}")]
    Plot { path: String, why: String },
    #[error("cannot encode the JSON report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("doctor found a problem that stops vmm from running guests")]
    DoctorFailed,
    #[error("every mode was refused on this host; nothing was measured")]
    NothingMeasured,
    #[error("{0}")]
    Requirement(String),
    #[error("--shard: {0}")]
    Shard(String),
    #[error("{runs} run(s) failed, in: {cells} (the report keeps every other run)")]
    RunsFailed { runs: usize, cells: String },
    #[error("unmet requirements: {0}")]
    RequirementsUnmet(String),
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

/// Creates an output file before anything is measured, so a bad path costs no run.
pub fn create_output(path: Option<&Path>) -> Result<Option<File>, CommandError> {
    path.map(|path| {
        File::create(path).map_err(|source| CommandError::Output {
            path: path.display().to_string(),
            source,
        })
    })
    .transpose()
}
