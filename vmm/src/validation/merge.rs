//! `vmm merge`: validation reports of one matrix — shards of it, or whole runs on other
//! hosts — added up into one. Runs keep their host; the same run (host, cell, repeat)
//! twice is refused, and so is a report of another matrix, payload or schema version.

use super::report::{HostRecord, ValidationInputs};
use super::{Shard, ValidationError};
use crate::report::SCHEMA_VERSION;
use std::path::{Path, PathBuf};

/// Reads one report's inputs (what was measured; the derived parts are recomputed).
pub fn read(path: &Path) -> Result<ValidationInputs, ValidationError> {
    let text = crate::input::read_text_capped(path, crate::input::MAX_REPORT_BYTES).map_err(|source| {
        ValidationError::ReadReport {
            path: path.to_owned(),
            source,
        }
    })?;
    // The schema version first, so another version is named as such, not as a parse error.
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|source| ValidationError::ParseReport {
            path: path.to_owned(),
            source,
        })?
        .get("schema_version")
        .and_then(serde_json::Value::as_u64);
    if version != Some(u64::from(SCHEMA_VERSION)) {
        return Err(ValidationError::Mismatch {
            path: path.to_owned(),
            why: format!(
                "its schema version is {}, and this vmm merges version {SCHEMA_VERSION}: re-run it with this vmm",
                version.map_or("missing".to_owned(), |v| v.to_string())
            ),
        });
    }
    let inputs: ValidationInputs = serde_json::from_str(&text).map_err(|source| ValidationError::ParseReport {
        path: path.to_owned(),
        source,
    })?;
    check(&inputs).map_err(|why| ValidationError::Mismatch {
        path: path.to_owned(),
        why,
    })?;
    Ok(inputs)
}

/// What a report read from a file must hold before anything is derived from it: shards
/// `--shard` could name, and records that name a host, a cell and a repeat it lists.
pub fn check(inputs: &ValidationInputs) -> Result<(), String> {
    for shard in inputs.hosts.iter().flat_map(|h| &h.shards) {
        Shard::new(shard.index, shard.count)?;
    }
    crate::limits::check_range(
        "repeats",
        u64::from(inputs.matrix.repeats),
        1,
        u64::from(crate::limits::MAX_REPEATS),
    )?;
    if inputs.matrix_cells.len() as u64 > crate::limits::MAX_JOBS {
        return Err(format!("it lists {} cells", inputs.matrix_cells.len()));
    }
    let (hosts, cells, repeats) = (inputs.hosts.len(), inputs.matrix_cells.len(), inputs.matrix.repeats);
    let records = inputs
        .runs
        .iter()
        .map(|r| (r.host, r.cell, r.repeat))
        .chain(inputs.failures.iter().map(|f| (f.host, f.cell, f.repeat)))
        .chain(inputs.refusals.iter().map(|r| (r.host, r.cell, 0)));
    for (host, cell, repeat) in records {
        if host >= hosts || cell >= cells || repeat >= repeats {
            return Err(format!(
                "a record names host {host}, cell {cell}, repeat {repeat}, beyond its {hosts} hosts, {cells} cells and {repeats} repeats"
            ));
        }
    }
    Ok(())
}

/// Adds `reports` (read from `paths`, in order) into one.
pub fn merge(reports: Vec<(PathBuf, ValidationInputs)>) -> Result<ValidationInputs, ValidationError> {
    let mut reports = reports.into_iter();
    let Some((first_path, mut merged)) = reports.next() else {
        return Err(ValidationError::Mismatch {
            path: PathBuf::from("(none)"),
            why: "no report to merge".into(),
        });
    };
    check_unique(
        &merged,
        &first_path,
        &ValidationInputs {
            runs: Vec::new(),
            failures: Vec::new(),
            ..merged.clone()
        },
    )?;
    for (path, report) in reports {
        let mismatch = |why: String| ValidationError::Mismatch {
            path: path.clone(),
            why,
        };
        if report.matrix != merged.matrix {
            return Err(mismatch(format!(
                "its matrix differs from {}'s: merge shards and hosts of one matrix only",
                first_path.display()
            )));
        }
        if report.matrix_cells != merged.matrix_cells {
            return Err(mismatch(
                "its cells differ (another vmm version expanded the matrix)".into(),
            ));
        }
        if report.payload_digest != merged.payload_digest {
            return Err(mismatch(format!(
                "it ran another payload ({}) than {} ({})",
                report.payload,
                first_path.display(),
                merged.payload
            )));
        }
        let hosts: Vec<usize> = report.hosts.iter().map(|h| add_host(&mut merged.hosts, h)).collect();
        let remap = |host: usize| {
            hosts
                .get(host)
                .copied()
                .ok_or_else(|| mismatch(format!("a record names host {host}, which it does not list")))
        };
        let mut runs = report.runs;
        for run in &mut runs {
            run.host = remap(run.host)?;
        }
        let mut failures = report.failures;
        for failure in &mut failures {
            failure.host = remap(failure.host)?;
        }
        let mut refusals = report.refusals;
        for refusal in &mut refusals {
            refusal.host = remap(refusal.host)?;
        }
        let incoming = ValidationInputs {
            runs,
            failures,
            refusals,
            ..merged.clone()
        };
        check_unique(&incoming, &path, &merged)?;
        merged.runs.extend(incoming.runs);
        merged.failures.extend(incoming.failures);
        merged.refusals.extend(incoming.refusals);
        // A partial shard keeps the merge partial, and says so.
        if let Some(why) = report.interrupted {
            let why = format!("{}: {why}", path.display());
            merged.interrupted = Some(match merged.interrupted.take() {
                Some(before) => format!("{before}; {why}"),
                None => why,
            });
            merged.interrupted_by = merged.interrupted_by.or(report.interrupted_by);
        }
    }
    merged.runs.sort_by_key(|r| (r.host, r.cell, r.repeat));
    Ok(merged)
}

/// The merged host a report's host is (the same identity), its shards added; or a new one.
fn add_host(hosts: &mut Vec<HostRecord>, host: &HostRecord) -> usize {
    let index = match hosts.iter().position(|h| h.identity == host.identity) {
        Some(index) => index,
        None => {
            hosts.push(HostRecord {
                identity: host.identity.clone(),
                shards: Vec::new(),
            });
            hosts.len() - 1
        }
    };
    let shards = &mut hosts[index].shards;
    for shard in &host.shards {
        if !shards.contains(shard) {
            shards.push(*shard);
        }
    }
    shards.sort();
    index
}

/// No job (host, cell, repeat) twice, run or failed: within `report`, or against what was
/// merged `already` (a shard given twice, or a CI retry's report beside the first).
fn check_unique(report: &ValidationInputs, path: &Path, already: &ValidationInputs) -> Result<(), ValidationError> {
    let key = |host, cell, repeat| (host, cell, repeat);
    let mut seen: std::collections::HashSet<(usize, usize, u32)> = already
        .runs
        .iter()
        .map(|r| key(r.host, r.cell, r.repeat))
        .chain(already.failures.iter().map(|f| key(f.host, f.cell, f.repeat)))
        .collect();
    let jobs = report
        .runs
        .iter()
        .map(|r| key(r.host, r.cell, r.repeat))
        .chain(report.failures.iter().map(|f| key(f.host, f.cell, f.repeat)));
    for (host, cell, repeat) in jobs {
        if !seen.insert((host, cell, repeat)) {
            let spec = report.matrix_cells.get(cell);
            return Err(ValidationError::Mismatch {
                path: path.to_owned(),
                why: format!(
                    "it holds run {} of cell {} | {} | busy {} on host {} again: a shard given twice, or a retry beside the first?",
                    repeat + 1,
                    spec.map_or("?", |c| c.mode.as_str()),
                    spec.map_or("?", |c| c.shaping.as_str()),
                    spec.map_or(0, |c| c.busy),
                    report.hosts.get(host).map_or("?".to_owned(), |h| h.identity.label())
                ),
            });
        }
    }
    Ok(())
}
