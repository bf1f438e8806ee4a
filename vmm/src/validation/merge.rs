//! `vmm merge`: validation reports of one matrix — shards of it, or whole runs on other
//! hosts — added up into one. Runs keep their host; the same run (host, cell, repeat)
//! twice is refused, and so is a report of another matrix, payload or schema version.

use super::matrix::{HostJobs, Shard};
use super::records::{HostIdentity, HostRecord, ValidationInputs};
use super::ValidationError;
use crate::report::SCHEMA_VERSION;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The largest report `merge` reads, and the most it reads in all: sizes are checked
/// before anything is parsed (`vmm merge --help` says so).
pub const MAX_INPUT_BYTES: u64 = crate::input::MAX_REPORT_BYTES;

/// The most hosts one merge holds (each host's identity is a record of its own).
pub const MAX_HOSTS: usize = 100_000;

/// Refusals stand for jobs: the most cell repeats all of a merge's refusals may name
/// together (each host refusing every cell of the largest matrix, 64 times over).
const MAX_REFUSED_JOBS: u64 = 64 * crate::limits::MAX_JOBS;

/// Refuses `paths` before any is read when one is larger than [`MAX_INPUT_BYTES`] or all
/// together are.
pub fn check_sizes(paths: &[PathBuf]) -> Result<(), ValidationError> {
    let mut total = 0u64;
    for path in paths {
        let size = std::fs::metadata(path)
            .map_err(|source| ValidationError::ReadReport {
                path: path.to_owned(),
                source,
            })?
            .len();
        total = total.saturating_add(size);
        let why = if size > MAX_INPUT_BYTES {
            format!("it holds {size} bytes, more than the {MAX_INPUT_BYTES} a report may")
        } else if total > MAX_INPUT_BYTES {
            format!("the reports hold {total} bytes up to it, more than the {MAX_INPUT_BYTES} a merge may read in all")
        } else {
            continue;
        };
        return Err(ValidationError::Mismatch {
            path: path.to_owned(),
            why,
        });
    }
    Ok(())
}

/// Reads one report's inputs (what was measured; the derived parts are recomputed).
pub fn read(path: &Path) -> Result<ValidationInputs, ValidationError> {
    let text = crate::input::read_text_capped(path, MAX_INPUT_BYTES).map_err(|source| ValidationError::ReadReport {
        path: path.to_owned(),
        source,
    })?;
    // The schema version first, so another version is named as such, not as a parse error
    // (the rest skipped, not built: a large report is not held twice).
    #[derive(serde::Deserialize)]
    struct Version {
        schema_version: Option<serde_json::Value>,
    }
    let version = serde_json::from_str::<Version>(&text)
        .map_err(|source| ValidationError::ParseReport {
            path: path.to_owned(),
            source,
        })?
        .schema_version;
    if version.as_ref().and_then(serde_json::Value::as_u64) != Some(u64::from(SCHEMA_VERSION)) {
        return Err(ValidationError::Mismatch {
            path: path.to_owned(),
            why: format!(
                "its schema version is {}, and this vmm merges version {SCHEMA_VERSION}: re-run it with this vmm",
                version.map_or("missing".to_owned(), |v| crate::escape::terminal(&v.to_string())
                    .into_owned())
            ),
        });
    }
    let inputs: ValidationInputs = serde_json::from_str(&text).map_err(|source| ValidationError::ParseReport {
        path: path.to_owned(),
        source,
    })?;
    drop(text);
    check(&inputs).map_err(|why| ValidationError::Mismatch {
        path: path.to_owned(),
        why,
    })?;
    Ok(inputs)
}

/// What a report read from a file must hold before anything is derived from it: shards
/// `--shard` could name (one partition per host), a matrix within the limits, and records
/// that name a host, a cell and a repeat it lists — a job of the shards that host ran,
/// each once.
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
    let (hosts, cells, repeats) = (inputs.hosts.len(), inputs.matrix_cells.len(), inputs.matrix.repeats);
    let total = cells as u64 * u64::from(repeats);
    if total > crate::limits::MAX_JOBS {
        return Err(format!(
            "it lists {cells} cells of {repeats} repeats: {total} jobs, more than the {} a matrix may have",
            crate::limits::MAX_JOBS
        ));
    }
    if hosts > MAX_HOSTS {
        return Err(format!(
            "it lists {hosts} hosts, more than the {MAX_HOSTS} a merge may hold"
        ));
    }
    let taken: Vec<HostJobs> = inputs
        .hosts
        .iter()
        .map(|h| HostJobs::new(&h.shards))
        .collect::<Result<_, _>>()?;
    let job = |cell: usize, repeat: u32| cell as u64 * u64::from(repeats) + u64::from(repeat);
    let records = inputs.runs.iter().map(|r| ("a run", r.host, r.cell, r.repeat)).chain(
        inputs
            .failures
            .iter()
            .map(|f| ("a failed run", f.host, f.cell, f.repeat)),
    );
    for (what, host, cell, repeat) in records {
        if host >= hosts || cell >= cells || repeat >= repeats {
            return Err(format!(
                "{what} names host {host}, cell {cell}, repeat {repeat}, beyond its {hosts} hosts, {cells} cells and {repeats} repeats"
            ));
        }
        if !taken[host].takes(job(cell, repeat)) {
            return Err(format!(
                "{what} (cell {cell}, repeat {}) on host {host} is not a job of the shards that host ran ({}): a run from outside its shards",
                repeat + 1,
                shard_names(&inputs.hosts[host].shards)
            ));
        }
    }
    let mut refused = std::collections::HashSet::new();
    let mut refused_jobs = 0u64;
    for refusal in &inputs.refusals {
        let (host, cell) = (refusal.host, refusal.cell);
        if host >= hosts || cell >= cells {
            return Err(format!(
                "a refusal names host {host}, cell {cell}, beyond its {hosts} hosts and {cells} cells"
            ));
        }
        if !refused.insert((host, cell)) {
            return Err(format!("it refuses cell {cell} on host {host} twice"));
        }
        refused_jobs += u64::from(repeats);
        if refused_jobs > MAX_REFUSED_JOBS {
            return Err(format!("its refusals stand for more than {MAX_REFUSED_JOBS} jobs"));
        }
        let mine = (0..repeats).filter(|&r| taken[host].takes(job(cell, r))).count() as u32;
        if refusal.jobs == 0 || refusal.jobs > mine {
            return Err(format!(
                "a refusal of cell {cell} on host {host} stands for {} jobs, and that host's shards hold {mine} of the cell",
                refusal.jobs
            ));
        }
    }
    // A merged report holds a stop per shard of a cell: one each, within its shard's jobs.
    let mut stopped = std::collections::HashSet::new();
    for stop in &inputs.stops {
        let (host, cell, shard) = (stop.host, stop.cell, stop.shard);
        if host >= hosts || cell >= cells {
            return Err(format!(
                "a stop names host {host}, cell {cell}, beyond its {hosts} hosts and {cells} cells"
            ));
        }
        if !inputs.hosts[host].shards.contains(&shard) {
            return Err(format!(
                "a stop of cell {cell} on host {host} names shard {shard}, which that host did not run"
            ));
        }
        if !stopped.insert((host, cell, shard.count, shard.index)) {
            return Err(format!("it stops cell {cell} on host {host} twice for shard {shard}"));
        }
        let mine = (0..repeats).filter(|&r| shard.takes(job(cell, r))).count() as u32;
        if stop.jobs > mine {
            return Err(format!(
                "a stop of cell {cell} on host {host} leaves {} jobs unrun, and its shard {shard} holds {mine} of the cell",
                stop.jobs
            ));
        }
    }
    Ok(())
}

fn shard_names(shards: &[Shard]) -> String {
    const SHOWN: usize = 5;
    let mut text = shards
        .iter()
        .take(SHOWN)
        .map(Shard::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if shards.len() > SHOWN {
        text += &format!(" and {} more", shards.len() - SHOWN);
    }
    if shards.is_empty() {
        text = "none".into();
    }
    text
}

/// A cell refused on a (merged) host, by the shards (count, index) of the report's host.
type RefusedBy = (usize, usize, Vec<(u32, u32)>);

/// Adds `reports` (read from `paths`, in order) into one. Linear in runs and hosts: hosts
/// are found by identity in a map, jobs in a set kept across the reports.
pub fn merge(reports: Vec<(PathBuf, ValidationInputs)>) -> Result<ValidationInputs, ValidationError> {
    let mut reports = reports.into_iter();
    let Some((first_path, first)) = reports.next() else {
        return Err(ValidationError::Mismatch {
            path: PathBuf::from("(none)"),
            why: "no report to merge".into(),
        });
    };
    let mut merged = ValidationInputs {
        hosts: Vec::new(),
        runs: Vec::new(),
        failures: Vec::new(),
        refusals: Vec::new(),
        stops: Vec::new(),
        interrupted: None,
        interrupted_by: None,
        ..first.clone_header()
    };
    let mut hosts: HashMap<HostIdentity, usize> = HashMap::new();
    let mut shards: Vec<BTreeSet<Shard>> = Vec::new();
    let mut seen: HashSet<(usize, usize, u32)> = HashSet::new();
    // A cell refused on a host, by the shards that refused it (each shard refuses its own
    // jobs of the cell; the same shard twice is a report given twice).
    let mut refused: HashSet<RefusedBy> = HashSet::new();
    let mut stopped: HashSet<(usize, usize, u32, u32)> = HashSet::new();
    for (path, report) in std::iter::once((first_path.clone(), first)).chain(reports) {
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
                crate::escape::terminal(&report.payload),
                first_path.display(),
                crate::escape::terminal(&merged.payload)
            )));
        }
        let report_shards: Vec<Vec<(u32, u32)>> = report
            .hosts
            .iter()
            .map(|h| h.shards.iter().map(|s| (s.count, s.index)).collect())
            .collect();
        let remapped: Vec<usize> = report
            .hosts
            .iter()
            .map(|h| {
                let index = *hosts.entry(h.identity.clone()).or_insert_with(|| {
                    merged.hosts.push(HostRecord {
                        identity: h.identity.clone(),
                        shards: Vec::new(),
                    });
                    shards.push(BTreeSet::new());
                    merged.hosts.len() - 1
                });
                shards[index].extend(h.shards.iter().copied());
                index
            })
            .collect();
        if merged.hosts.len() > MAX_HOSTS {
            return Err(mismatch(format!(
                "the merge reaches {} hosts with it, more than the {MAX_HOSTS} a merge may hold",
                merged.hosts.len()
            )));
        }
        let remap = |host: usize| {
            remapped
                .get(host)
                .copied()
                .ok_or_else(|| mismatch(format!("a record names host {host}, which it does not list")))
        };
        let ValidationInputs {
            runs,
            failures,
            mut retried,
            refusals,
            stops,
            interrupted,
            interrupted_by,
            ..
        } = report;
        let job_again = |host: usize, cell: usize, repeat: u32| {
            let spec = merged.matrix_cells.get(cell);
            mismatch(format!(
                "it holds run {} of cell {} | {} | busy {} on host {} again: a shard given twice, or a retry beside the first?",
                repeat + 1,
                spec.map_or("?".into(), |c| crate::escape::terminal(&c.mode)),
                spec.map_or("?".into(), |c| crate::escape::terminal(&c.shaping)),
                spec.map_or(0, |c| c.busy),
                merged.hosts.get(host).map_or("?".to_owned(), |h| crate::escape::terminal(&h.identity.label()).into_owned())
            ))
        };
        let mut new_runs = Vec::with_capacity(runs.len());
        for mut run in runs {
            run.host = remap(run.host)?;
            if !seen.insert((run.host, run.cell, run.repeat)) {
                return Err(job_again(run.host, run.cell, run.repeat));
            }
            new_runs.push(run);
        }
        let mut new_failures = Vec::with_capacity(failures.len());
        for mut failure in failures {
            failure.host = remap(failure.host)?;
            if !seen.insert((failure.host, failure.cell, failure.repeat)) {
                return Err(job_again(failure.host, failure.cell, failure.repeat));
            }
            new_failures.push(failure);
        }
        let mut new_refusals = Vec::with_capacity(refusals.len());
        for mut refusal in refusals {
            let mut by: Vec<(u32, u32)> = report_shards.get(refusal.host).cloned().unwrap_or_default();
            by.sort();
            refusal.host = remap(refusal.host)?;
            if !refused.insert((refusal.host, refusal.cell, by)) {
                return Err(mismatch(format!(
                    "it refuses cell {} on host {} again, for the same shards: a shard given twice?",
                    refusal.cell, refusal.host
                )));
            }
            new_refusals.push(refusal);
        }
        let mut new_stops = Vec::with_capacity(stops.len());
        for mut stop in stops {
            stop.host = remap(stop.host)?;
            // A stop is its shard's: the same shard's stop twice is a report given twice.
            if !stopped.insert((stop.host, stop.cell, stop.shard.count, stop.shard.index)) {
                return Err(mismatch(format!(
                    "it stops cell {} on host {} again, for shard {}: a shard given twice?",
                    stop.cell, stop.host, stop.shard
                )));
            }
            new_stops.push(stop);
        }
        merged.stops.append(&mut new_stops);
        merged.runs.append(&mut new_runs);
        merged.failures.append(&mut new_failures);
        for attempt in &mut retried {
            attempt.host = remap(attempt.host)?;
        }
        merged.retried.append(&mut retried);
        merged.refusals.append(&mut new_refusals);
        // A partial shard keeps the merge partial, and says so, naming its file.
        if let Some(why) = interrupted {
            let why = format!("{}: {}", path.display(), crate::escape::terminal(&why));
            merged.interrupted = Some(match merged.interrupted.take() {
                Some(before) => format!("{before}; {why}"),
                None => why,
            });
            merged.interrupted_by = merged.interrupted_by.or(interrupted_by);
        }
    }
    for (host, set) in merged.hosts.iter_mut().zip(shards) {
        host.shards = set.into_iter().collect();
    }
    // Each host's shards, all reports together, are still one partition.
    for host in &merged.hosts {
        HostJobs::new(&host.shards).map_err(|why| ValidationError::Mismatch {
            path: first_path.clone(),
            why: format!(
                "with the other reports, {why} (host {})",
                crate::escape::terminal(&host.identity.label())
            ),
        })?;
    }
    merged.runs.sort_by_key(|r| (r.host, r.cell, r.repeat));
    Ok(merged)
}
