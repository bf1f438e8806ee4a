//! The guest ABI's results, read back: the one type every back end returns (a VM, the
//! native runner, a native twin), and the parser of the result block they all write.

use guest_payload::{Config, Cycles, Probe, ResultHeader, ABI_VERSION, RESULT_MAGIC};
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("the result block is not valid: {0}")]
    Invalid(&'static str),
    #[error("cannot read the result block: {0}")]
    Read(String),
}

/// The samples of one run, per probe.
pub type ProbeSamples = BTreeMap<Probe, Vec<Cycles>>;

/// What one run measured, as the guest ABI's result block says: the same for a VM, the
/// native runner and a native twin.
#[derive(Clone, Debug, Default)]
pub struct Results {
    pub samples: ProbeSamples,
    /// Counter ticks over each sample, where the run had a counter vCPU.
    pub ticks: ProbeSamples,
    /// TSC cycles and ticks over the guest's rate window, where it reported one.
    pub counter_rate: Option<(u64, u64)>,
    pub cpuid: Vec<guest_payload::CpuidRecord>,
    /// The bytes at each CPUID site as the guest read its own code (with the snapshot).
    pub site_bytes: Vec<[u8; 2]>,
    /// The payload's own verdict, where it reported one.
    pub verdict: Option<PayloadVerdictReport>,
    /// The clocks read at the ends of the quiet span and around the probes, where any were.
    pub clocks: Option<ClockRecord>,
}

/// The clocks a run read (ABI `ResultHeader::clocks` and after): in a VM every clock it
/// offers, natively the TSC and the host's monotonic clock in PM timer ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClockRecord {
    /// `guest_payload::clocks` bits: which fields of the readings mean anything.
    pub read: u32,
    /// The TSC rate kvmclock states, in kHz (0: no kvmclock).
    pub kvmclock_tsc_khz: u32,
    /// At the two ends of a loop with no CPUID in it.
    pub quiet: [ClockSnapshot; 2],
    /// Before the first probe and after the last.
    pub span: [ClockSnapshot; 2],
}

/// One reading of every clock (`guest_payload::ClockReadings`, serialisable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClockSnapshot {
    pub tsc: u64,
    pub msr_tsc: u64,
    pub pm_timer: u64,
    pub kvmclock_ns: u64,
    pub rdtscp: u64,
    pub aperf: u64,
    pub mperf: u64,
}

impl From<guest_payload::ClockReadings> for ClockSnapshot {
    fn from(r: guest_payload::ClockReadings) -> Self {
        Self {
            tsc: r.tsc,
            msr_tsc: r.msr_tsc,
            pm_timer: r.pm_timer,
            kvmclock_ns: r.kvmclock_ns,
            rdtscp: r.rdtscp,
            aperf: r.aperf,
            mperf: r.mperf,
        }
    }
}

/// A payload's own verdict, as it reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct PayloadVerdictReport {
    pub verdict: guest_payload::PayloadVerdict,
    pub score: f64,
    /// Its reason, with anything but printable ASCII shown escaped.
    pub reason: String,
}

/// Parses a result block, wherever it lives (guest memory, a native twin's file): `read`
/// returns `len` bytes at `offset` from the block's start. A payload reports the probes
/// and samples it measured (a detector measures what it measures: the timing core is held
/// to exactly what was asked elsewhere), never more than the area the VMM gave it.
pub fn parse_results(
    config: &Config,
    read: impl Fn(u64, usize) -> Result<Vec<u8>, ResultsError>,
) -> Result<Results, ResultsError> {
    let header_bytes = read(0, std::mem::size_of::<ResultHeader>())?;
    let header = ResultHeader::from_bytes(&header_bytes).ok_or(ResultsError::Invalid("too short"))?;
    if header.magic != RESULT_MAGIC {
        return Err(ResultsError::Invalid("the guest never wrote its magic"));
    }
    if header.abi_version != ABI_VERSION {
        return Err(ResultsError::Invalid("the guest speaks another ABI version"));
    }
    if header.probes & !guest_payload::Probe::ALL.iter().fold(0, |all, p| all | p.bit()) != 0 {
        return Err(ResultsError::Invalid(
            "the guest reported a probe this VMM does not know",
        ));
    }
    // Tick counts follow the samples only where the guest says so (a payload of its own
    // may run with a counter and report TSC samples alone).
    if header.ticks != 0 && config.counter_addr == 0 {
        return Err(ResultsError::Invalid(
            "the guest reported counter ticks and the run has no counter",
        ));
    }
    let reported = Config {
        probes: header.probes,
        iterations: header.iterations,
        counter_addr: if header.ticks != 0 { config.counter_addr } else { 0 },
        ..*config
    };
    if reported.result_bytes_needed() > config.result_capacity {
        return Err(ResultsError::Invalid(
            "the guest reported more samples than its result area holds",
        ));
    }
    let read_samples = |offset: u64| -> Result<Vec<Cycles>, ResultsError> {
        let bytes = read(offset, header.iterations as usize * std::mem::size_of::<Cycles>())?;
        Ok(bytes
            .chunks_exact(std::mem::size_of::<Cycles>())
            .map(|c| Cycles::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    };
    let mut results = Results::default();
    for probe in guest_payload::probes_in(header.probes) {
        let offset = header
            .sample_offset(probe)
            .ok_or(ResultsError::Invalid("a probe without samples"))?;
        results.samples.insert(probe, read_samples(offset)?);
        if let Some(offset) = header.tick_offset(probe) {
            results.ticks.insert(probe, read_samples(offset)?);
        }
    }
    if header.ticks != 0 && header.rate_ticks != 0 {
        results.counter_rate = Some((header.rate_cycles, header.rate_ticks));
    }
    let count = (header.cpuid_count as usize).min(header.cpuid.len());
    results.cpuid = header.cpuid[..count].to_vec();
    if header.site_bytes_valid != 0 {
        let sites = guest_payload::timing::CPUID_SITE_SYMBOLS.len();
        results.site_bytes = header.site_bytes[..sites].to_vec();
    }
    results.verdict = match guest_payload::PayloadVerdict::from_u32(header.verdict) {
        Some(guest_payload::PayloadVerdict::None) => None,
        Some(verdict) => Some(PayloadVerdictReport {
            verdict,
            score: header.score_milli as f64 / 1000.0,
            reason: header.reason_text().escape_ascii().to_string(),
        }),
        None => {
            return Err(ResultsError::Invalid(
                "the guest reported a verdict this VMM does not know",
            ))
        }
    };
    if header.clocks != 0 {
        results.clocks = Some(ClockRecord {
            read: header.clocks,
            kvmclock_tsc_khz: header.kvmclock_tsc_khz,
            quiet: header.quiet.map(ClockSnapshot::from),
            span: header.span.map(ClockSnapshot::from),
        });
    }
    Ok(results)
}
