//! Validation: an experiment matrix (modes × shaping × busyness, each repeated), every run
//! scored by every detector rule against the ground truth of its cell, on one host or
//! many (shards of one matrix, merged).
//!
//! Ground truth: every VM cell is virtual. A native cell is what its host is: on bare
//! metal native, on a host that is itself a VM (`doctor` knows), virtual — and the reports
//! say so, because then a rule flagging native runs is right, not a false positive.
//!
//! Its parts import one way, each only those above it in this list:
//! - `confusion`: a rule's verdicts counted, and its confusion matrix;
//! - `requirements`: `RULE:tpr>=X` parsed and judged on the confusion matrices;
//! - `matrix`: the config file (its requirements checked), its cells, and the slice of
//!   jobs a shard runs;
//! - `records`: what was measured, every run kept as a record;
//! - `sweep`: cells alike but for one number, read as a detection curve per rule;
//! - `roc`: each rule's ROC curve, its AUC and its own threshold's point on it;
//! - `report`: everything derived from the records, and the requirements judged;
//! - `render`: the report as a text table, Markdown and JUnit XML;
//! - `figures`: the ROC and sweep curves as SVG;
//! - `merge`: shard and host reports added up into one.

pub mod confusion;
pub mod figures;
pub mod matrix;
pub mod merge;
pub mod records;
pub mod render;
pub mod report;
pub mod requirements;
pub mod roc;
pub mod sweep;

pub use matrix::{ground_truth, Cell, MatrixConfig, Shard};
pub use report::ValidationReport;

use crate::shaping::profile::ProfileError;
use std::path::PathBuf;

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
    #[error("cannot read the report {path}: {source}")]
    ReadReport { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a vmm validation report: {source}")]
    ParseReport { path: PathBuf, source: serde_json::Error },
    #[error("cannot merge {path}: {why}")]
    Mismatch { path: PathBuf, why: String },
}
