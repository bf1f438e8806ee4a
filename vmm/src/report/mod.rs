//! Reports of a run: the JSON document (a versioned schema), the human table and raw CSV.

pub mod csv;
pub mod plot;
pub mod table;

use crate::detector::RuleVerdict;
use crate::host::{CpuInfo, KvmFlavour, TscFrequency};
use crate::measure::{Measurement, RunSpec, ShapingOutcome};
use crate::modes::trap_emulate::{Trap, TrapDelivery};
use crate::modes::Mode;
use crate::shaping::ShapingReport;
use crate::stats::{self, Summary};
use crate::vm::exits::ExitSummary;
use crate::vm::loader::Payload;
use guest_payload::Probe;
use serde::Serialize;
use std::collections::BTreeMap;

/// Bumped when a field changes meaning or disappears (adding fields does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// The host as a report describes it.
#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    pub cpu_model: String,
    pub is_vm: bool,
    pub invariant_tsc: bool,
    pub tsc_khz: u32,
    pub tsc_khz_source: crate::host::TscSource,
    pub kvm: KvmReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct KvmReport {
    pub flavour: KvmFlavour,
    pub module: Option<&'static str>,
    pub api_version: Option<i32>,
}

impl HostReport {
    pub fn new(cpu: &CpuInfo, tsc: TscFrequency, api_version: Option<i32>) -> Self {
        let (flavour, module) = crate::host::kvm_flavour();
        Self {
            cpu_model: cpu.model.clone(),
            is_vm: cpu.is_vm,
            invariant_tsc: cpu.invariant_tsc,
            tsc_khz: tsc.khz,
            tsc_khz_source: tsc.source,
            kvm: KvmReport {
                flavour,
                module,
                api_version,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConfigReport {
    pub iterations: u32,
    pub warmup: u32,
    pub cpuid_leaf: u32,
    pub cpuid_subleaf: u32,
    pub probes: Vec<&'static str>,
    pub timeout_s: f64,
    /// Host threads burning CPU during the run (--busy).
    pub busy: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PayloadReport {
    pub source: String,
    pub entry: u64,
    /// Guest addresses of the CPUID sites found in the ELF's symbol table.
    pub cpuid_sites: BTreeMap<&'static str, u64>,
}

/// A probe's statistics, in cycles, and the same in nanoseconds.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    #[serde(flatten)]
    pub cycles: Summary,
    pub ns: NsSummary,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct NsSummary {
    pub min: f64,
    pub p5: f64,
    pub median: f64,
    pub mean: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl NsSummary {
    fn new(s: &Summary, tsc_khz: u32) -> Self {
        let ns = |cycles: f64| round2(stats::cycles_to_ns(cycles, tsc_khz));
        Self {
            min: ns(s.min as f64),
            p5: ns(s.p5 as f64),
            median: ns(s.median as f64),
            mean: ns(s.mean),
            p95: ns(s.p95 as f64),
            p99: ns(s.p99 as f64),
            max: ns(s.max as f64),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// CPUID's median cost over NOP's: the classic test's signal.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Excess {
    pub median_cycles: i64,
    pub median_ns: f64,
    /// CPUID median / NOP median.
    pub ratio: f64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timings {
    /// VM creation to the first guest instruction (KVM_RUN); absent for native runs.
    pub setup_us: Option<u64>,
    pub run_us: u64,
}

/// One run, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub schema_version: u32,
    pub vmm_version: &'static str,
    pub mode: Mode,
    pub host: HostReport,
    pub payload: PayloadReport,
    pub config: ConfigReport,
    pub probes: BTreeMap<&'static str, ProbeReport>,
    pub cpuid_excess_over_nop: Option<Excess>,
    pub exits: BTreeMap<String, ExitSummary>,
    /// Every detector rule's verdict on this run.
    pub verdicts: Vec<RuleVerdict>,
    pub timings: Timings,
    /// trap-emulate only: the trap mechanism and how this KVM delivered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trap: Option<TrapReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_cpu: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpuid_snapshot: Vec<guest_payload::CpuidRecord>,
    /// The first bytes of each CPUID site as the measured code read them (`[15, 162]` is
    /// `0f a2`, CPUID; anything else was patched).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpuid_site_bytes: Vec<[u8; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<BTreeMap<&'static str, Vec<u64>>>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct TrapReport {
    pub mechanism: Trap,
    pub delivery: Option<TrapDelivery>,
}

impl RunReport {
    pub fn new(
        spec: &RunSpec,
        payload: &Payload,
        host: HostReport,
        measurement: &Measurement,
        verdicts: Vec<RuleVerdict>,
        include_samples: bool,
    ) -> Self {
        let tsc_khz = host.tsc_khz;
        let probes: BTreeMap<&'static str, ProbeReport> = measurement
            .samples
            .iter()
            .filter_map(|(probe, samples)| {
                let cycles = stats::summarize(samples)?;
                Some((
                    probe.name(),
                    ProbeReport {
                        ns: NsSummary::new(&cycles, tsc_khz),
                        cycles,
                    },
                ))
            })
            .collect();
        let excess = match (probes.get(Probe::Cpuid.name()), probes.get(Probe::Nop.name())) {
            (Some(cpuid), Some(nop)) => {
                let cycles = cpuid.cycles.median as i64 - nop.cycles.median as i64;
                Some(Excess {
                    median_cycles: cycles,
                    median_ns: round2(stats::cycles_to_ns(cycles as f64, tsc_khz)),
                    ratio: round2(cpuid.cycles.median as f64 / nop.cycles.median.max(1) as f64),
                })
            }
            _ => None,
        };
        let shaping = measurement.shaping.as_ref().map(|outcome| {
            let median = probes.get(Probe::Cpuid.name()).map_or(0, |p| p.cycles.median);
            shaping_report(outcome, median, tsc_khz)
        });
        let cpuid_sites = guest_payload::timing::CPUID_SITE_SYMBOLS
            .iter()
            .filter_map(|&name| Some((name, payload.symbol(name)?)))
            .collect();
        Self {
            schema_version: SCHEMA_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION"),
            mode: spec.mode,
            host,
            payload: PayloadReport {
                source: payload.source.to_string(),
                entry: payload.entry,
                cpuid_sites,
            },
            probes,
            config: ConfigReport {
                iterations: spec.iterations,
                warmup: spec.warmup,
                cpuid_leaf: spec.cpuid_leaf,
                cpuid_subleaf: spec.cpuid_subleaf,
                probes: guest_payload::probes_in(spec.probes).map(Probe::name).collect(),
                timeout_s: spec.timeout.as_secs_f64(),
                busy: spec.busy,
            },
            cpuid_excess_over_nop: excess,
            exits: measurement.exits.summary(),
            verdicts,
            timings: Timings {
                setup_us: measurement.setup.map(|d| d.as_micros() as u64),
                run_us: measurement.run.as_micros() as u64,
            },
            trap: (spec.mode == Mode::TrapEmulate).then_some(TrapReport {
                mechanism: spec.trap,
                delivery: measurement.trap_delivery,
            }),
            shaping,
            native_cpu: measurement.native_cpu,
            cpuid_snapshot: measurement.cpuid.clone(),
            cpuid_site_bytes: measurement.site_bytes.clone(),
            samples: include_samples.then(|| measurement.samples.iter().map(|(p, s)| (p.name(), s.clone())).collect()),
        }
    }
}

/// Requested against achieved: for inject kinds the CPUID median over the calibration
/// run's, for hide and profiles the guest-seen median itself.
fn shaping_report(outcome: &ShapingOutcome, cpuid_median: u64, tsc_khz: u32) -> ShapingReport {
    let (before, after) = (&outcome.before, outcome.after.as_ref());
    let baseline = after.map_or(before.baseline.median, |a| {
        (before.baseline.median + a.baseline.median) / 2
    });
    let achieved = if outcome.additive {
        cpuid_median as i64 - baseline as i64
    } else {
        cpuid_median as i64
    };
    let change = |before: u64, after: u64| (after as f64 - before as f64).abs() / (before.max(1) as f64);
    let residues = outcome.residues();
    let drift = after.map(|a| {
        let baseline_drift = change(before.baseline.median, a.baseline.median);
        let residue_drift = match residues {
            Some((r, Some(r_after))) => change(r, r_after),
            _ => 0.0,
        };
        round2(baseline_drift.max(residue_drift))
    });
    ShapingReport {
        kind: outcome.kind,
        requested_cycles: outcome.requested_cycles,
        achieved_cycles: achieved,
        requested_ns: round2(stats::cycles_to_ns(outcome.requested_cycles as f64, tsc_khz)),
        achieved_ns: round2(stats::cycles_to_ns(achieved as f64, tsc_khz)),
        baseline_cycles: before.baseline.median,
        baseline_spread_cycles: before.baseline.p95 - before.baseline.p5,
        residue_cycles: residues.map(|(r, _)| r),
        baseline_after_cycles: after.map(|a| a.baseline.median),
        residue_after_cycles: residues.and_then(|(_, a)| a),
        calibration_drift: drift,
        tsc_method: outcome.tsc_method,
        profile: outcome.profile.clone(),
        seed: outcome.seed,
    }
}
