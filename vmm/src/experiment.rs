//! An experiment session: the payload, the host, KVM and the detector's calibration, set
//! up once; then any number of runs, each measured, judged by every rule and reported.
//! `run`, `compare`, `calibrate` and `validate` are all made of these.

use crate::detector::{self, Calibration, Evidence};
use crate::host::HostInfo;
use crate::host::{self, TscFrequency};
use crate::measure::{MeasureError, Measurement, Measurer, RunSpec};
use crate::report::RunReport;
use crate::vm::loader::Payload;
use std::io::Write;

pub struct Session {
    pub measurer: Measurer,
    pub payload: Payload,
    pub calibration: Calibration,
    pub host: HostInfo,
    pub tsc: TscFrequency,
}

impl Session {
    /// Opens /dev/kvm where it is there (it is required only by VM modes, when they run).
    pub fn open(payload: Payload, calibration: Calibration) -> Self {
        let measurer = Measurer::open();
        let kvm = measurer.kvm().ok();
        let tsc = host::tsc_frequency(kvm.and_then(|k| k.tsc_khz));
        let host = HostInfo::new(&host::cpu_info(), tsc, kvm.map(|k| k.kvm.get_api_version()));
        if let Some(differences) = calibration.other_host(&host) {
            eprintln!(
                "vmm: WARNING: the calibration was measured on another host ({differences}): \
                 its native figures do not describe this one, so the calibrated rules may be wrong here. \
                 Run `vmm calibrate` on this host."
            );
        }
        Self {
            measurer,
            payload,
            calibration,
            host,
            tsc,
        }
    }

    /// What the rules see of `measurement`.
    pub fn evidence<'a>(&self, spec: &RunSpec, measurement: &'a Measurement) -> Evidence<'a> {
        Evidence {
            ticks: &measurement.results.ticks,
            counter_rate: measurement.results.counter_rate,
            samples: &measurement.results.samples,
            cpuid: &measurement.results.cpuid,
            site_bytes: &measurement.results.site_bytes,
            tsc_khz: self.host.tsc_khz,
            cpuid_leaf: spec.cpuid_leaf,
            payload: measurement.results.verdict.as_ref(),
            patched_for_an_evader: spec.patched_for_an_evader(),
            clocks: measurement.results.clocks,
        }
    }

    /// Each timing rule's samples to decision on `measurement` (resampled: seconds on a
    /// long run, so only where asked).
    pub fn samples_to_decision(
        &self,
        spec: &RunSpec,
        measurement: &Measurement,
        report: &RunReport,
    ) -> Vec<detector::decision::Decision> {
        detector::decision::samples_to_decision(&self.evidence(spec, measurement), &self.calibration, &report.verdicts)
    }

    /// One run: measured, judged by every rule, reported.
    pub fn run(
        &self,
        spec: &RunSpec,
        include_samples: bool,
        console: Option<&mut (dyn Write + Send)>,
    ) -> Result<(RunReport, Measurement), MeasureError> {
        let measurement = self.measurer.measure(&self.payload, spec, console)?;
        let evidence = self.evidence(spec, &measurement);
        let verdicts = detector::evaluate(&evidence, &self.calibration);
        let mut report = RunReport::new(
            spec,
            &self.payload,
            self.host.clone(),
            &measurement,
            verdicts,
            include_samples,
        );
        report.not_applicable = detector::not_applicable(&evidence);
        Ok((report, measurement))
    }
}
