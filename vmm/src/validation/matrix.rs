//! The experiment matrix: modes × shaping × busyness, each cell repeated; the ground truth
//! of each cell; and the deterministic slice of the matrix's jobs a shard runs.

use super::ValidationError;
use crate::detector::Verdict;
use crate::modes::{self, Mode};
use crate::shaping::latency::Shaping;
use crate::shaping::plan;
use crate::shaping::profile::Profile;
use crate::shaping::registry::Evasions;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A validation config file (see `configs/README.md`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatrixConfig {
    pub description: String,
    /// Runs per cell.
    pub repeats: u32,
    pub iterations: u32,
    #[serde(default = "default_warmup")]
    pub warmup: u32,
    /// Paths, spelled as `modes::Path` spells them: `native`, `hw-assist`, `trap-emulate`
    /// (= `trap-emulate:hw-breakpoint`), `trap-emulate:int3-patch`, `trap-emulate:io-patch`,
    /// `paravirt`.
    pub modes: Vec<String>,
    /// `none`, `inject-ns:N`, `inject-cycles:N`, `virtual-inject-cycles:N`, `hide`,
    /// `hide:C`, `profile:NAME`. Shaping applies to trap-emulate and paravirt cells only.
    /// `KIND:A..B/S` sweeps the value from A to B in steps of S, a cell each.
    #[serde(default = "default_shaping")]
    pub shaping: Vec<String>,
    /// Host threads burning CPU, one cell per value.
    #[serde(default = "default_busy")]
    pub busy: Vec<u16>,
    /// vCPUs of every run: 2 adds the counter vCPU (and its clock rules).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Evasions, one cell per value: `none`, or evasions joined with `+`
    /// (`pause-counter`, `shared-offset`, `tsc-khz:N`; `vmm run --evade`). Like shaping,
    /// only for trap-emulate and paravirt cells. `NAME:A..B/S` sweeps an evader's
    /// argument (`rdtsc-kvm-handler:1..32/1`).
    #[serde(default = "default_evasions")]
    pub evasions: Vec<String>,
    /// Probes every run takes, by name (`vmm run --probes`); empty: the defaults (with
    /// `vcpus: 2` the counter's too). Add `msr-cpuid` for vmcheck's MSR window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<String>,
    /// Repeat each cell until every rule's exact 95% interval of its flagged rate is at
    /// most this wide (`repeats` is then the bound); `--precision` sets it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    /// What the validation must show to pass, as `RULE:METRIC OP VALUE` (e.g.
    /// `robust:tpr>=0.99`); `--require` adds more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
}

fn default_warmup() -> u32 {
    100
}
fn default_shaping() -> Vec<String> {
    vec!["none".into()]
}
fn default_busy() -> Vec<u16> {
    vec![0]
}
fn default_vcpus() -> u8 {
    1
}
fn default_evasions() -> Vec<String> {
    vec!["none".into()]
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub path: modes::Path,
    pub shaping_label: String,
    pub shaping: Shaping,
    pub busy: u16,
    pub evasion_label: String,
    pub evasions: Evasions,
    /// The shaping stages a real host (a profile whose ground truth is `host`).
    pub truth_host: bool,
}

impl Cell {
    pub fn label(&self) -> String {
        let evasion = match self.evasion_label.as_str() {
            "none" => String::new(),
            label => format!(" | evade {label}"),
        };
        format!("{} | {}{evasion} | busy {}", self.path, self.shaping_label, self.busy)
    }

    /// What the cell's runs truly are.
    pub fn truth(&self, host_is_vm: bool) -> Verdict {
        if self.truth_host {
            Verdict::Native
        } else {
            ground_truth(self.path.mode(), host_is_vm)
        }
    }
}

/// Values one sweep may take, at most.
pub const MAX_SWEEP_POINTS: u64 = 1_000;

/// `NAME:A..B/S` as `NAME:A`, `NAME:A+S`, … up to B; any other text as it is.
pub fn expand_sweep(text: &str) -> Result<Vec<String>, String> {
    let Some((name, range)) = text.split_once(':') else {
        return Ok(vec![text.to_owned()]);
    };
    // A sweep starts with a number: `profile:../mine.json` is a path, not one.
    let Some((from, rest)) = range
        .split_once("..")
        .filter(|(from, _)| !from.is_empty() && from.bytes().all(|b| b.is_ascii_digit()))
    else {
        return Ok(vec![text.to_owned()]);
    };
    let form = || format!("`{text}`: a sweep is NAME:FROM..TO/STEP, whole numbers, FROM <= TO, STEP >= 1");
    let (to, step) = rest.split_once('/').ok_or_else(form)?;
    let number = |t: &str| t.trim().parse::<u64>().map_err(|_| form());
    let (from, to, step) = (number(from)?, number(to)?, number(step)?);
    if from > to || step == 0 {
        return Err(form());
    }
    let points = (to - from) / step + 1;
    if points > MAX_SWEEP_POINTS {
        return Err(format!("`{text}` sweeps {points} values, more than {MAX_SWEEP_POINTS}"));
    }
    Ok((0..points).map(|i| format!("{name}:{}", from + i * step)).collect())
}

/// Every value of `list`, sweeps expanded.
fn expanded(list: &[String]) -> Result<Vec<String>, String> {
    let mut all = Vec::new();
    for text in list {
        all.extend(expand_sweep(text)?);
    }
    Ok(all)
}

fn parse_evasions(text: &str) -> Result<Evasions, crate::shaping::evasion::EvasionError> {
    Evasions::parse(text.split('+'))
}

fn parse_shaping(text: &str, tsc_khz: u32) -> Result<Option<Shaping>, crate::shaping::profile::ProfileError> {
    let (kind, value) = text.split_once(':').map_or((text, None), |(k, v)| (k, Some(v)));
    use crate::limits::{MAX_INJECT_NS, MAX_SHAPING_CYCLES};
    // A value past the CLI's own bound is no value: the shaping is refused by name.
    let bounded = |max: u64| {
        value
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n >= 1 && n <= max)
    };
    let number = bounded(MAX_SHAPING_CYCLES);
    Ok(match (kind, value) {
        ("none", None) => Some(Shaping::None),
        ("inject-ns", Some(_)) => bounded(MAX_INJECT_NS).map(|ns| Shaping::Inject {
            cycles: plan::ns_to_cycles(ns, tsc_khz),
        }),
        ("inject-cycles", Some(_)) => number.map(|cycles| Shaping::Inject { cycles }),
        ("virtual-inject-cycles", Some(_)) => number.map(|cycles| Shaping::VirtualInject { cycles }),
        ("hide", None) => Some(Shaping::Hide { target: None }),
        ("hide", Some(_)) => number.map(|target| Shaping::Hide { target: Some(target) }),
        ("profile", Some(name)) => Some(Shaping::Profile {
            profile: Box::new(Profile::load(name)?),
            seed: 0x5eed,
        }),
        _ => None,
    })
}

impl MatrixConfig {
    pub fn load(path: &Path) -> Result<Self, ValidationError> {
        let text = crate::input::read_text_capped(path, crate::input::MAX_CONFIG_BYTES).map_err(|source| {
            ValidationError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::parse(&text, path)
    }

    /// A matrix from its text (`path` names it in messages), checked against the limits.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ValidationError> {
        let config: Self = serde_json::from_str(text).map_err(|source| ValidationError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |why: String| ValidationError::Invalid {
            path: path.to_owned(),
            why,
        };
        use crate::limits::{check_range, MAX_REPEATS, MAX_WARMUP};
        check_range("repeats", u64::from(config.repeats), 1, u64::from(MAX_REPEATS)).map_err(invalid)?;
        check_range("warmup", u64::from(config.warmup), 0, u64::from(MAX_WARMUP)).map_err(invalid)?;
        check_range(
            "iterations",
            u64::from(config.iterations),
            1,
            u64::from(crate::limits::MAX_ITERATIONS),
        )
        .map_err(invalid)?;
        if config.modes.is_empty() || config.shaping.is_empty() || config.busy.is_empty() || config.evasions.is_empty()
        {
            return Err(invalid(
                "modes, shaping, busy and evasions each need at least one value".into(),
            ));
        }
        check_range("vcpus", u64::from(config.vcpus), 1, 2).map_err(invalid)?;
        if let Some(width) = config.precision {
            if !(width > 0.0 && width < 1.0) {
                return Err(invalid(format!(
                    "precision {width}: an interval's width, between 0 and 1 (0.1: every rate known to ±0.05)"
                )));
            }
        }
        let shaping = expanded(&config.shaping).map_err(|why| invalid(format!("shaping {why}")))?;
        let evasions = expanded(&config.evasions).map_err(|why| invalid(format!("evasion {why}")))?;
        if let Some((text, Err(why))) = evasions
            .iter()
            .map(|e| (e, parse_evasions(e)))
            .find(|(_, e)| e.is_err())
        {
            return Err(invalid(format!("evasion `{text}`: {why}")));
        }
        if let Some(Err(why)) = config
            .modes
            .iter()
            .map(|m| m.parse::<modes::Path>())
            .find(Result::is_err)
        {
            return Err(invalid(why));
        }
        if let Some(&busy) = config.busy.iter().find(|&&b| b > crate::limits::MAX_BUSY) {
            return Err(invalid(format!(
                "busy {busy} is more than {} threads",
                crate::limits::MAX_BUSY
            )));
        }
        let cells = (config.modes.len() as u64)
            .saturating_mul(shaping.len() as u64)
            .saturating_mul(config.busy.len() as u64)
            .saturating_mul(evasions.len() as u64);
        let jobs = cells.saturating_mul(u64::from(config.repeats));
        if jobs > crate::limits::MAX_JOBS {
            return Err(invalid(format!(
                "{cells} cells × {} repeats is {jobs} jobs, more than {}",
                config.repeats,
                crate::limits::MAX_JOBS
            )));
        }
        for requirement in &config.requirements {
            requirement
                .parse::<super::requirements::Requirement>()
                .map_err(|why| invalid(format!("requirement `{requirement}`: {why}")))?;
        }
        Ok(config)
    }

    /// The cells, in config order; shaping other than `none` only for the modes whose
    /// exits the VMM handles, evasions only where they act (an RDTSC trap on every VM
    /// path, the others where the VMM handles CPUID).
    /// The probes of every run, as bits: the named ones, or the defaults.
    pub fn probe_bits(&self, path: &Path) -> Result<u32, ValidationError> {
        if self.probes.is_empty() {
            return Ok(crate::measure::default_probes(self.vcpus == 2));
        }
        self.probes.iter().try_fold(0, |bits, name| {
            let probe = guest_payload::Probe::ALL
                .into_iter()
                .find(|p| p.name() == name)
                .ok_or_else(|| ValidationError::Invalid {
                    path: path.to_owned(),
                    why: format!(
                        "unknown probe `{name}` ({})",
                        guest_payload::Probe::ALL.map(|p| p.name()).join(", ")
                    ),
                })?;
            Ok(bits | probe.bit())
        })
    }

    pub fn cells(&self, tsc_khz: u32, path: &Path) -> Result<Vec<Cell>, ValidationError> {
        let invalid = |why: String| ValidationError::Invalid {
            path: path.to_owned(),
            why,
        };
        let shapings = expanded(&self.shaping).map_err(|why| invalid(format!("shaping {why}")))?;
        let evasion_texts = expanded(&self.evasions).map_err(|why| invalid(format!("evasion {why}")))?;
        let mut cells = Vec::new();
        for mode_text in &self.modes {
            let cell_path: modes::Path = mode_text.parse().map_err(|why| ValidationError::Invalid {
                path: path.to_owned(),
                why,
            })?;
            for shaping_text in &shapings {
                let shaping = parse_shaping(shaping_text, tsc_khz)?.ok_or_else(|| ValidationError::Invalid {
                    path: path.to_owned(),
                    why: format!("unknown shaping `{shaping_text}` (none, inject-ns:N, inject-cycles:N, virtual-inject-cycles:N, hide, hide:C, profile:NAME; KIND:FROM..TO/STEP sweeps N)"),
                })?;
                if shaping != Shaping::None && !cell_path.vmm_handles_cpuid() {
                    continue;
                }
                let truth_host = matches!(&shaping, Shaping::Profile { profile, .. }
                    if profile.ground_truth == Some(crate::shaping::profile::GroundTruth::Host));
                for evasion_text in &evasion_texts {
                    let evasions = parse_evasions(evasion_text).map_err(|why| ValidationError::Invalid {
                        path: path.to_owned(),
                        why: format!("evasion `{evasion_text}`: {why}"),
                    })?;
                    if !evasions.is_none()
                        && !evasions.act_on(cell_path != modes::Path::Native, cell_path.vmm_handles_cpuid())
                    {
                        continue;
                    }
                    for &busy in &self.busy {
                        cells.push(Cell {
                            path: cell_path,
                            shaping_label: shaping_text.clone(),
                            shaping: shaping.clone(),
                            busy,
                            evasion_label: evasions.name(),
                            evasions: evasions.clone(),
                            truth_host,
                        });
                    }
                }
            }
        }
        Ok(cells)
    }
}

/// What the cell's runs truly are.
pub fn ground_truth(mode: Mode, host_is_vm: bool) -> Verdict {
    match mode {
        Mode::Native if !host_is_vm => Verdict::Native,
        _ => Verdict::Virtual,
    }
}

/// A deterministic slice of a matrix: shard `index` of `count` (1-based) runs the jobs
/// (cell × repeat, numbered cell by cell) whose number is `index - 1` modulo `count`. Every
/// job belongs to exactly one shard, whatever the host, and a job's shaping (its profile
/// seed included) depends on its cell alone, so N shards run exactly the runs of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

/// The variables `--shard auto` reads: each names the shard by itself, so where more than
/// one is set they must agree.
pub const SHARD_VARIABLES: [&str; 3] = ["VMM_SHARD_INDEX", "JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"];

impl Shard {
    /// The whole matrix.
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    pub fn takes(self, job: u64) -> bool {
        job % u64::from(self.count) == u64::from(self.index - 1)
    }

    /// `--shard auto`: the shard a batch engine's environment names.
    /// - `VMM_SHARD_INDEX` (0-based) with `VMM_SHARD_COUNT`: set by hand.
    /// - Kubernetes Indexed Job: `JOB_COMPLETION_INDEX` (0-based) with `VMM_SHARD_COUNT`.
    /// - Slurm array: the task's place in the array, (`SLURM_ARRAY_TASK_ID` − `_MIN`) / `_STEP`
    ///   of `_COUNT` (`--array=0-6:2` is four shards); an array that is a list (`1,2,5`)
    ///   cannot be mapped and is refused. With `VMM_SHARD_COUNT` set, the task IDs *are*
    ///   the 0-based shard numbers instead: `sbatch --array=3` re-runs shard 4 of N.
    ///
    /// Sources that disagree (a `VMM_SHARD_INDEX` left in the submitting shell, inside a
    /// Slurm job) are refused, naming both; none is silently preferred.
    pub fn from_environment(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let number = |name: &str| -> Result<Option<u32>, String> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("{name}={v} is not a number"))
                })
                .transpose()
        };
        let explicit_count = number("VMM_SHARD_COUNT")?;
        let zero_based = |name: &str, index: u32| -> Result<Shard, String> {
            let count =
                explicit_count.ok_or_else(|| format!("{name} is set but not the shard count: set VMM_SHARD_COUNT"))?;
            let index = index
                .checked_add(1)
                .ok_or_else(|| format!("{name}={index} is too large"))?;
            Shard::new(index, count).map_err(|why| format!("{name}={} of VMM_SHARD_COUNT={count}: {why}", index - 1))
        };
        let mut found: Vec<(&str, Shard)> = Vec::new();
        for name in SHARD_VARIABLES {
            let Some(index) = number(name)? else { continue };
            let shard = if name == "SLURM_ARRAY_TASK_ID" && explicit_count.is_none() {
                slurm_shard(index, &number)?
            } else {
                if name == "SLURM_ARRAY_TASK_ID" && number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1) > 1 {
                    return Err(
                        "VMM_SHARD_COUNT with a stepped Slurm array (SLURM_ARRAY_TASK_STEP > 1) is ambiguous: \
                         unset VMM_SHARD_COUNT to number shards by their place in the array, or submit task IDs 0..N-1"
                            .into(),
                    );
                }
                zero_based(name, index)?
            };
            found.push((name, shard));
        }
        match found.as_slice() {
            [] => Err(
                "`auto` found no shard index: set VMM_SHARD_INDEX (0-based) and VMM_SHARD_COUNT, \
                 or run as a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) or a Slurm array (SLURM_ARRAY_TASK_ID)"
                    .into(),
            ),
            [(_, shard), rest @ ..] if rest.iter().all(|(_, s)| s == shard) => Ok(*shard),
            all => Err(format!(
                "`auto` found sources that disagree: {}; unset the one that does not belong (a VMM_SHARD_INDEX left in the submitting shell?)",
                all.iter()
                    .map(|(name, s)| format!("{name} says shard {}/{}", s.index, s.count))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Shard `index` of `count`, checked (also what a report read back must hold).
    pub fn new(index: u32, count: u32) -> Result<Self, String> {
        if count == 0 || count > 100_000 || index == 0 || index > count {
            return Err(format!(
                "shard {index}/{count}: the index must be 1..=count, the count 1..=100000"
            ));
        }
        Ok(Shard { index, count })
    }
}

/// A Slurm task's shard: its place in the array, `(ID - MIN) / STEP` of `COUNT`.
fn slurm_shard(id: u32, number: &dyn Fn(&str) -> Result<Option<u32>, String>) -> Result<Shard, String> {
    let need = |name: &str| number(name)?.ok_or_else(|| format!("SLURM_ARRAY_TASK_ID is set but not {name}"));
    let (min, count) = (need("SLURM_ARRAY_TASK_MIN")?, need("SLURM_ARRAY_TASK_COUNT")?);
    let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1);
    let max = number("SLURM_ARRAY_TASK_MAX")?;
    let vars = format!(
        "SLURM_ARRAY_TASK_ID={id} MIN={min} MAX={} STEP={step} COUNT={count}",
        max.map_or("(unset)".to_owned(), |m| m.to_string())
    );
    if step == 0 {
        return Err(format!("{vars}: a step of 0"));
    }
    let last = u64::from(min) + u64::from(count.saturating_sub(1)) * u64::from(step);
    if max.is_some_and(|max| u64::from(max) != last) {
        return Err(format!(
            "{vars}: the array is a list (e.g. --array=1,2,5), not a range, so a task's place in it is unknown; \
             submit a range (--array=0-N or 0-N:S), or set VMM_SHARD_COUNT and use task IDs 0..N-1 as shard numbers"
        ));
    }
    if count == 1 && min != 0 {
        return Err(format!(
            "{vars}: an array of one task cannot say how many shards the matrix has (re-running one shard?): \
             set VMM_SHARD_COUNT to the whole array's count, and the task ID is taken as the 0-based shard"
        ));
    }
    let offset = id
        .checked_sub(min)
        .ok_or_else(|| format!("{vars}: the ID is below MIN"))?;
    if offset % step != 0 {
        return Err(format!("{vars}: the ID is not on the array's step"));
    }
    Shard::new(offset / step + 1, count).map_err(|why| format!("{vars}: {why}"))
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `K/N` (1-based K), or `auto` (see [`Shard::from_environment`]).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "auto" {
            for name in SHARD_VARIABLES.iter().chain(&["VMM_SHARD_COUNT"]) {
                if matches!(std::env::var(name), Err(std::env::VarError::NotUnicode(_))) {
                    return Err(format!("{name} is not UTF-8 text"));
                }
            }
            return Shard::from_environment(|name| std::env::var(name).ok());
        }
        let (index, count) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not K/N (e.g. 2/3) or auto"))?;
        let parse = |n: &str| {
            n.parse::<u32>()
                .map_err(|_| format!("`{text}` is not K/N (e.g. 2/3) or auto"))
        };
        Shard::new(parse(index)?, parse(count)?)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The jobs (cell × repeat, numbered cell by cell) a host's shards take: all of one
/// partition (one count), as a shard at a time runs them.
#[derive(Clone, Debug, Default)]
pub struct HostJobs {
    count: u32,
    indices: std::collections::HashSet<u32>,
}

impl HostJobs {
    /// A host's shards, refused when they are slices of different partitions.
    pub fn new(shards: &[Shard]) -> Result<Self, String> {
        let count = shards.first().map_or(1, |s| s.count);
        if let Some(other) = shards.iter().find(|s| s.count != count) {
            return Err(format!(
                "a host ran shards of different partitions ({}/{count} and {other}): merge the shards of one partition K/N",
                shards[0].index
            ));
        }
        Ok(Self {
            count,
            indices: shards.iter().map(|s| s.index).collect(),
        })
    }

    pub fn takes(&self, job: u64) -> bool {
        // job % count < count <= 100000: fits u32.
        self.indices
            .contains(&((job % u64::from(self.count.max(1))) as u32 + 1))
    }

    /// How many of the jobs `0..total` the shards take.
    pub fn jobs(&self, total: u64) -> u64 {
        let count = u64::from(self.count.max(1));
        self.indices
            .iter()
            .map(|&index| {
                let first = u64::from(index) - 1;
                if first >= total {
                    0
                } else {
                    (total - first).div_ceil(count)
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<MatrixConfig, ValidationError> {
        let path = std::env::temp_dir().join(format!("vmm-validation-{}-{}.json", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        let result = MatrixConfig::load(&path);
        std::fs::remove_file(&path).ok();
        result
    }

    #[test]
    fn shaping_expands_only_for_vmm_handled_modes() {
        let c = config(r#"{"description":"t","repeats":2,"iterations":10,"modes":["native","hw-assist","paravirt","trap-emulate:int3-patch"],"shaping":["none","inject-ns:1000","hide"],"busy":[0,2]}"#).unwrap();
        let cells = c.cells(2_000_000, Path::new("t.json")).unwrap();
        // native, hw-assist: 1 shaping × 2 busy; paravirt, trap: 3 × 2.
        assert_eq!(cells.len(), 2 + 2 + 6 + 6);
        assert!(cells
            .iter()
            .filter(|c| c.path == modes::Path::Native)
            .all(|c| c.shaping == Shaping::None));
        assert!(cells.iter().any(|c| c.shaping == Shaping::Inject { cycles: 2_000 }));
    }

    #[test]
    fn evasions_expand_only_for_vmm_handled_modes_and_a_root_partition_is_a_host() {
        let c = config(
            r#"{"description":"t","repeats":1,"iterations":10,"vcpus":2,"modes":["native","paravirt"],"shaping":["none","profile:hyperv-root"],"evasions":["none","pause-counter","hide-and-seek"]}"#,
        );
        assert!(matches!(c, Err(ValidationError::Invalid { why, .. }) if why.contains("hide-and-seek")));
        let c = config(r#"{"description":"t","repeats":1,"iterations":10,"vcpus":2,"modes":["native","paravirt"],"shaping":["none","profile:hyperv-root"],"evasions":["none","pause-counter+shared-offset"]}"#).unwrap();
        let cells = c.cells(2_000_000, Path::new("t.json")).unwrap();
        // native: none × none; paravirt: 2 shapings × 2 evasions.
        assert_eq!(cells.len(), 1 + 4);
        assert!(cells
            .iter()
            .filter(|c| c.path == modes::Path::Native)
            .all(|c| c.evasions.is_none()));
        let root: Vec<_> = cells
            .iter()
            .filter(|c| c.shaping_label == "profile:hyperv-root")
            .collect();
        assert_eq!(root.len(), 2);
        assert!(root.iter().all(|c| c.truth(true) == Verdict::Native && c.truth_host));
        let paused = cells.iter().find(|c| c.evasions.has("pause-counter")).unwrap();
        assert_eq!(paused.evasion_label, "pause-counter+shared-offset");
        assert!(paused.label().contains("evade pause-counter+shared-offset"));
        assert_eq!(paused.truth(false), Verdict::Virtual);
        for vcpus in ["0", "3"] {
            let bad = config(&format!(
                r#"{{"description":"t","repeats":1,"iterations":10,"vcpus":{vcpus},"modes":["native"]}}"#
            ));
            assert!(
                matches!(bad, Err(ValidationError::Invalid { why, .. }) if why.contains("vcpus")),
                "{vcpus}"
            );
        }
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        assert!(matches!(config("{"), Err(ValidationError::Parse { .. })));
        let unknown_mode = config(r#"{"description":"t","repeats":1,"iterations":10,"modes":["vmware"]}"#);
        assert!(matches!(unknown_mode, Err(ValidationError::Invalid { why, .. }) if why.contains("vmware")));
        let zero = config(r#"{"description":"t","repeats":0,"iterations":10,"modes":["native"]}"#);
        assert!(matches!(zero, Err(ValidationError::Invalid { .. })));
        let bad_shaping = config(
            r#"{"description":"t","repeats":1,"iterations":10,"modes":["paravirt"],"shaping":["inject-ns:lots"]}"#,
        )
        .unwrap();
        assert!(bad_shaping.cells(1, Path::new("t")).is_err());
    }

    #[test]
    fn files_meet_the_command_lines_limits() {
        let base =
            |extra: &str| format!(r#"{{"description":"t","repeats":1,"iterations":10,"modes":["paravirt"]{extra}}}"#);
        // A warm-up the CLI refuses, a spin of 584 years, a hide target past any cost.
        for extra in [
            r#","warmup":4000000000"#,
            r#","shaping":["inject-ns:18446744073709551615"]"#,
            r#","shaping":["inject-cycles:18446744073709551615"]"#,
            r#","shaping":["hide:9223372036854775808"]"#,
        ] {
            let parsed = config(&base(extra)).and_then(|c| c.cells(2_000_000, Path::new("t")).map(|_| ()));
            assert!(parsed.is_err(), "{extra} was accepted");
        }
        // Jobs past the limit: 10,000 repeats of 200 cells.
        let modes = vec!["\"paravirt\""; 200].join(",");
        let many = format!(r#"{{"description":"t","repeats":10000,"iterations":10,"modes":[{modes}]}}"#);
        assert!(matches!(config(&many), Err(ValidationError::Invalid { why, .. }) if why.contains("jobs")));
    }

    #[test]
    fn shards_take_every_job_exactly_once() {
        let shards: Vec<Shard> = (1..=3).map(|k| format!("{k}/3").parse().unwrap()).collect();
        for job in 0..100 {
            assert_eq!(shards.iter().filter(|s| s.takes(job)).count(), 1, "job {job}");
        }
        assert!(Shard::WHOLE.takes(7));
        for bad in ["0/3", "4/3", "1/0", "3", "a/b", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn shard_auto_reads_the_batch_engines_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        // Kubernetes Indexed Job: 0-based JOB_COMPLETION_INDEX, the count set by hand.
        let k8s = Shard::from_environment(env(&[("JOB_COMPLETION_INDEX", "2"), ("VMM_SHARD_COUNT", "4")]));
        assert_eq!(k8s, Ok(Shard { index: 3, count: 4 }));
        // Slurm array 1-5: the task id counts from SLURM_ARRAY_TASK_MIN.
        let slurm = Shard::from_environment(env(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "5"),
        ]));
        assert_eq!(slurm, Ok(Shard { index: 1, count: 5 }));
        let plain = Shard::from_environment(env(&[("VMM_SHARD_INDEX", "0"), ("VMM_SHARD_COUNT", "2")]));
        assert_eq!(plain, Ok(Shard { index: 1, count: 2 }));
        let no_count = Shard::from_environment(env(&[("JOB_COMPLETION_INDEX", "0")]));
        assert!(no_count.unwrap_err().contains("VMM_SHARD_COUNT"));
        assert!(Shard::from_environment(env(&[]))
            .unwrap_err()
            .contains("JOB_COMPLETION_INDEX"));
        let past = Shard::from_environment(env(&[("VMM_SHARD_INDEX", "2"), ("VMM_SHARD_COUNT", "2")]));
        assert!(past.is_err(), "index 2 of 2 is past the last (0-based)");
    }

    #[test]
    fn shard_auto_maps_slurm_steps_and_refuses_lists_and_disagreements() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        // --array=0-6:2: four tasks, each its own shard.
        let stepped = |id: &'static str| {
            let pairs: &'static [(&'static str, &'static str)] = match id {
                "0" => &[
                    ("SLURM_ARRAY_TASK_ID", "0"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "6"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                "2" => &[
                    ("SLURM_ARRAY_TASK_ID", "2"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "6"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                "4" => &[
                    ("SLURM_ARRAY_TASK_ID", "4"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "6"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
                _ => &[
                    ("SLURM_ARRAY_TASK_ID", "6"),
                    ("SLURM_ARRAY_TASK_MIN", "0"),
                    ("SLURM_ARRAY_TASK_MAX", "6"),
                    ("SLURM_ARRAY_TASK_STEP", "2"),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
            };
            Shard::from_environment(env(pairs)).map(|s| s.index)
        };
        assert_eq!(["0", "2", "4", "6"].map(stepped), [Ok(1), Ok(2), Ok(3), Ok(4)]);
        // --array=1,2,5: a list.
        let list = Shard::from_environment(env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]));
        assert!(list.unwrap_err().contains("is a list"));
        // --array=3 alone: a re-run of one shard needs the count, and then takes the ID.
        let rerun = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        let lone = Shard::from_environment(env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ]));
        assert!(lone.unwrap_err().contains("VMM_SHARD_COUNT"));
        let counted = Shard::from_environment(|name: &str| {
            rerun
                .iter()
                .chain(&[("VMM_SHARD_COUNT", "8")])
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(counted, Ok(Shard { index: 4, count: 8 }));
        // A VMM_SHARD_INDEX left in the shell, inside a Slurm job: refused, naming both.
        let leaked = Shard::from_environment(env(&[
            ("VMM_SHARD_INDEX", "0"),
            ("VMM_SHARD_COUNT", "4"),
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]))
        .unwrap_err();
        assert!(
            leaked.contains("VMM_SHARD_INDEX says shard 1/4") && leaked.contains("SLURM_ARRAY_TASK_ID says shard 3/4"),
            "{leaked}"
        );
    }

    #[test]
    fn native_cells_are_virtual_on_a_virtual_host() {
        assert_eq!(ground_truth(Mode::Native, false), Verdict::Native);
        assert_eq!(ground_truth(Mode::Native, true), Verdict::Virtual);
        assert_eq!(ground_truth(Mode::HwAssist, false), Verdict::Virtual);
    }

    #[test]
    fn a_sweep_expands_into_a_cell_per_value_and_a_bad_one_is_refused_by_its_form() {
        assert_eq!(
            expand_sweep("inject-ns:100..400/150").unwrap(),
            ["inject-ns:100", "inject-ns:250", "inject-ns:400"]
        );
        assert_eq!(expand_sweep("inject-ns:100").unwrap(), ["inject-ns:100"]);
        assert_eq!(
            expand_sweep("profile:../profiles/mine.json").unwrap(),
            ["profile:../profiles/mine.json"],
            "a path is no sweep"
        );
        assert!(expand_sweep("inject-ns:1..x/1")
            .unwrap_err()
            .contains("NAME:FROM..TO/STEP"));
        for bad in [
            "inject-ns:5..1/1",
            "inject-ns:1..5/0",
            "inject-ns:1..5",
            "inject-ns:1..5/x",
        ] {
            assert!(expand_sweep(bad).unwrap_err().contains("FROM <= TO"), "{bad}");
        }
        assert!(expand_sweep("inject-ns:1..100000/1")
            .unwrap_err()
            .contains("more than 1000"));
        let c = config(
            r#"{"description":"t","repeats":2,"iterations":10,"modes":["paravirt"],"shaping":["none","inject-ns:1000..3000/1000"],"evasions":["none","rdtsc-kvm-handler:10..30/10"]}"#,
        )
        .unwrap();
        let cells = c.cells(2_000_000, std::path::Path::new("t.json")).unwrap();
        // (none + 3 injections) × (none + 3 dividers).
        assert_eq!(cells.len(), 16);
        assert!(cells
            .iter()
            .any(|c| c.shaping_label == "inject-ns:2000" && c.evasion_label == "rdtsc-kvm-handler:30"));
        let error = config(
            r#"{"description":"t","repeats":1,"iterations":10,"modes":["paravirt"],"shaping":["inject-ns:9..1/1"]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("shaping `inject-ns:9..1/1`"), "{error}");
    }
}
