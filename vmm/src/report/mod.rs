//! Reports of a run: the JSON document (a versioned schema), the human table and raw CSV.

pub mod csv;
pub mod plot;
pub mod shaping;
pub mod table;
pub mod trace;

use crate::detector::{NotApplicable, RuleVerdict};
use crate::host::HostInfo;
use crate::measure::{Measurement, RunSpec};
use crate::modes::trap_emulate::{Trap, TrapDelivery};
use crate::modes::{Mode, Path};
use crate::stats::{self, Summary};
use crate::vm::accounting::ExitSummary;
use crate::vm::loader::Payload;
use crate::vm::vcpu::RegisterAccess;
use guest_payload::Probe;
use serde::Serialize;
use shaping::ShapingReport;
use std::collections::BTreeMap;

/// Bumped when a field changes meaning or disappears (adding fields does not bump it).
/// 2: samples and cycle statistics are signed (a TSC that ran backwards is negative).
/// 3: validation reports keep every run as a record (what `vmm merge` adds up), rules are
///    keyed by name, and the matrix itself is part of the report.
pub const SCHEMA_VERSION: u32 = 4;

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
    /// 2 with a counter vCPU (natively, a counter thread).
    pub vcpus: u8,
    /// The evasions of the run (`none`, or names joined with `+`).
    pub evasion: String,
}

/// The counter clock of a run with `--vcpus 2`.
#[derive(Clone, Debug, Serialize)]
pub struct CounterReport {
    /// Counter ticks over each probe's samples.
    pub ticks: BTreeMap<&'static str, stats::Summary>,
    /// TSC cycles per counter tick over the run's rate window (4,096 ticks timed before
    /// any probe, with no exit in them): the counter's rate, as the TSC sees it.
    pub cycles_per_tick: Option<f64>,
    /// What the counter vCPU went through (VM runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<crate::vm::CounterStats>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PayloadReport {
    pub source: String,
    pub entry: u64,
    /// Guest addresses of the timing core's CPUID sites, by their symbols.
    pub cpuid_sites: BTreeMap<&'static str, u64>,
    /// Every CPUID the VMM found by decoding the payload's code (what trap-emulate traps),
    /// symbols or not.
    pub decoded_cpuid_sites: Vec<u64>,
    /// The name the payload declares in `vmm_payload_info`; absent if it declares nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub declared_name: Option<String>,
    /// Whether it declares the timing core (`VMM_CAP_TIMING_CORE`): measures exactly the
    /// probes and iterations asked. Other payloads measure what they measure.
    pub timing_core: bool,
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
    /// CPUID median / NOP median; `None` where either median is not positive (a payload
    /// that reports such samples: a ratio of them means nothing).
    pub ratio: Option<f64>,
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
    /// The mode and, for trap-emulate, its trap, in the one spelling `validate` takes.
    pub path: Path,
    pub host: HostInfo,
    pub payload: PayloadReport,
    pub config: ConfigReport,
    pub probes: BTreeMap<&'static str, ProbeReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counter: Option<CounterReport>,
    pub cpuid_excess_over_nop: Option<Excess>,
    pub exits: BTreeMap<String, ExitSummary>,
    /// Every detector rule's verdict on this run.
    pub verdicts: Vec<RuleVerdict>,
    /// The rules this run's make-up rules out, each with why (not scored).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_applicable: Vec<NotApplicable>,
    /// `run --samples-to-decision`: per timing rule, the fewest samples that decide it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples_to_decision: Vec<crate::detector::decision::Decision>,
    pub timings: Timings,
    /// trap-emulate only: the trap mechanism and how this KVM delivered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trap: Option<TrapReport>,
    /// How registers travelled at each exit: KVM_CAP_SYNC_REGS or the ioctls (VM modes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register_access: Option<RegisterAccess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingReport>,
    /// An RDTSC-trapping evasion's reads: sites patched, reads answered, and how far the
    /// clock it answered with was from the guest's real TSC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tsc_trap: Option<crate::modes::tsc_trap::TscTrapRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native_cpu: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpuid_snapshot: Vec<guest_payload::CpuidRecord>,
    /// Every clock the run read, at the ends of its quiet span and around its probes.
    pub clocks: Option<crate::results::ClockRecord>,
    /// The first bytes of each CPUID site as the measured code read them (`[15, 162]` is
    /// `0f a2`, CPUID; anything else was patched).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cpuid_site_bytes: Vec<[u8; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<BTreeMap<&'static str, Vec<guest_payload::Cycles>>>,
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
        host: HostInfo,
        measurement: &Measurement,
        verdicts: Vec<RuleVerdict>,
        include_samples: bool,
    ) -> Self {
        let tsc_khz = host.tsc_khz;
        let probes: BTreeMap<&'static str, ProbeReport> = measurement
            .results
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
                let cycles = cpuid.cycles.median.saturating_sub(nop.cycles.median);
                Some(Excess {
                    median_cycles: cycles,
                    median_ns: round2(stats::cycles_to_ns(cycles as f64, tsc_khz)),
                    ratio: (cpuid.cycles.median > 0 && nop.cycles.median > 0)
                        .then(|| round2(cpuid.cycles.median as f64 / nop.cycles.median as f64)),
                })
            }
            _ => None,
        };
        let shaping = measurement.shaping.as_ref().map(|outcome| {
            let cpuid = probes.get(Probe::Cpuid.name()).map(|p| &p.cycles);
            ShapingReport::new(outcome, cpuid, &measurement.shaped, tsc_khz)
        });
        let cpuid_sites = guest_payload::timing::CPUID_SITE_SYMBOLS
            .iter()
            .filter_map(|&name| Some((name, payload.symbol(name)?)))
            .collect();
        Self {
            schema_version: SCHEMA_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION"),
            mode: spec.path.mode(),
            path: spec.path,
            host,
            payload: PayloadReport {
                source: payload.source.to_string(),
                entry: payload.entry,
                cpuid_sites,
                decoded_cpuid_sites: payload.cpuid_sites.clone(),
                declared_name: payload.declared_name(),
                timing_core: payload.declares(guest_payload::capabilities::TIMING_CORE),
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
                vcpus: if spec.counter { 2 } else { 1 },
                evasion: spec.evasions.name(),
            },
            counter: (!measurement.results.ticks.is_empty()).then(|| CounterReport {
                ticks: measurement
                    .results
                    .ticks
                    .iter()
                    .filter_map(|(probe, ticks)| Some((probe.name(), stats::summarize(ticks)?)))
                    .collect(),
                cycles_per_tick: crate::detector::clocks::cycles_per_tick(measurement.results.counter_rate),
                vcpu: measurement.counter,
            }),
            cpuid_excess_over_nop: excess,
            exits: measurement.exits.summary(),
            verdicts,
            not_applicable: Vec::new(),
            samples_to_decision: Vec::new(),
            timings: Timings {
                setup_us: measurement.setup.map(|d| d.as_micros() as u64),
                run_us: measurement.run.as_micros() as u64,
            },
            trap: spec.path.trap().map(|mechanism| TrapReport {
                mechanism,
                delivery: measurement.trap_delivery,
            }),
            register_access: measurement.register_access,
            shaping,
            tsc_trap: measurement.tsc_trap.clone(),
            native_cpu: measurement.native_cpu,
            cpuid_snapshot: measurement.results.cpuid.clone(),
            clocks: measurement.results.clocks,
            cpuid_site_bytes: measurement.results.site_bytes.clone(),
            samples: include_samples.then(|| {
                measurement
                    .results
                    .samples
                    .iter()
                    .map(|(p, s)| (p.name(), s.clone()))
                    .collect()
            }),
        }
    }
}
