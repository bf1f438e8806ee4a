//! An experiment session: the payload, the host, KVM and the detector's calibration, set
//! up once; then any number of runs, each measured, judged by every rule and reported.
//! `run`, `compare`, `calibrate` and `validate` are all made of these.

use crate::detector::{self, Calibration, Evidence};
use crate::host::{self, TscFrequency};
use crate::measure::{self, MeasureError, Measurement, RunSpec};
use crate::report::{HostReport, RunReport};
use crate::vm::loader::Payload;
use kvm_ioctls::Kvm;
use std::io::Write;

pub struct Session {
    /// /dev/kvm, or why it could not be opened (the VM modes' error).
    kvm: Result<Kvm, kvm_ioctls::Error>,
    pub payload: Payload,
    pub calibration: Calibration,
    pub host: HostReport,
    pub tsc: TscFrequency,
}

impl Session {
    /// Opens /dev/kvm where it is there (it is required only by VM modes, when they run).
    pub fn open(payload: Payload, calibration: Calibration) -> Self {
        let kvm = Kvm::new();
        let tsc = host::tsc_frequency(kvm.as_ref().ok().and_then(measure::kvm_tsc_khz));
        let host = HostReport::new(&host::cpu_info(), tsc, kvm.as_ref().ok().map(|k| k.get_api_version()));
        Self {
            kvm,
            payload,
            calibration,
            host,
            tsc,
        }
    }

    /// /dev/kvm, where it could be opened.
    pub fn kvm(&self) -> Option<&Kvm> {
        self.kvm.as_ref().ok()
    }

    /// The KVM handle for a VM mode, or the reason there is none.
    fn kvm_for(&self, spec: &RunSpec) -> Result<Option<&Kvm>, MeasureError> {
        match &self.kvm {
            Ok(kvm) => Ok(Some(kvm)),
            Err(_) if spec.mode == crate::modes::Mode::Native => Ok(None),
            Err(error) => Err(MeasureError::OpenKvm(*error)),
        }
    }

    /// One run: measured, judged by every rule, reported.
    pub fn run(
        &self,
        spec: &RunSpec,
        include_samples: bool,
        console: Option<&mut dyn Write>,
    ) -> Result<(RunReport, Measurement), MeasureError> {
        let kvm = self.kvm_for(spec)?;
        let measurement = measure::measure(kvm, &self.payload, spec, console)?;
        let mut host = self.host.clone();
        if let Some(khz) = measurement.kvm_tsc_khz {
            let tsc = host::tsc_frequency(Some(khz));
            host.tsc_khz = tsc.khz;
            host.tsc_khz_source = tsc.source;
        }
        let evidence = Evidence {
            samples: &measurement.samples,
            cpuid: &measurement.cpuid,
            site_bytes: &measurement.site_bytes,
            tsc_khz: host.tsc_khz,
            cpuid_leaf: spec.cpuid_leaf,
        };
        let verdicts = detector::evaluate(&evidence, &self.calibration);
        let report = RunReport::new(spec, &self.payload, host, &measurement, verdicts, include_samples);
        Ok((report, measurement))
    }
}
