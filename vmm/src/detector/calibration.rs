//! Calibration: what this host's native runs look like, saved by `vmm calibrate` and read
//! by the rules (`--calibration FILE`). Without one, the rules use documented defaults and
//! say that they are uncalibrated.

use crate::host::HostInfo;
use crate::results::ProbeSamples;
use crate::stats;
use guest_payload::{Cycles, Probe};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped when a field changes meaning.
pub const CALIBRATION_SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot read the calibration {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the calibration {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("the calibration {path} has schema {found}; this vmm reads schema {CALIBRATION_SCHEMA}: run `vmm calibrate` again")]
    Schema { path: PathBuf, found: u32 },
    #[error("the calibration {path} holds no native run")]
    Empty { path: PathBuf },
    #[error("the calibration {path} holds {what} = {value}: a calibration's figures are finite, and spreads are not negative")]
    Value {
        path: PathBuf,
        what: &'static str,
        value: f64,
    },
    #[error("cannot write the calibration {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The figures of one run that calibration keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunPoint {
    pub nop_median: Cycles,
    pub cpuid_median: Cycles,
    /// CPUID's 10th percentile minus the floor's median, in ns.
    pub excess_p10_ns: f64,
    /// CPUID's median minus the floor's median, in ns.
    pub excess_median_ns: f64,
}

impl RunPoint {
    /// `None` where the run lacks the CPUID probe or any floor (rdtsc or nop).
    pub fn from_samples(samples: &ProbeSamples, tsc_khz: u32) -> Option<Self> {
        let cpuid = samples.get(&Probe::Cpuid)?;
        let floor = samples.get(&Probe::Rdtsc).or_else(|| samples.get(&Probe::Nop))?;
        let nop = samples.get(&Probe::Nop).unwrap_or(floor);
        let mut sorted = cpuid.clone();
        sorted.sort_unstable();
        let floor_median = stats::median(floor) as f64;
        let ns = |cycles: f64| stats::cycles_to_ns(cycles, tsc_khz);
        Some(Self {
            nop_median: stats::median(nop),
            cpuid_median: stats::percentile_of_sorted(&sorted, 50.0),
            excess_p10_ns: ns(stats::percentile_of_sorted(&sorted, 10.0) as f64 - floor_median),
            excess_median_ns: ns(stats::percentile_of_sorted(&sorted, 50.0) as f64 - floor_median),
        })
    }
}

/// Mean and standard deviation across runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub sd: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Self {
            mean,
            sd: variance.sqrt(),
        }
    }
}

/// A dividing line on the (NOP, CPUID) plane, in log10 space:
/// log10(CPUID) = intercept + slope × log10(NOP); above it is the virtual side.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub intercept: f64,
    pub slope: f64,
}

impl Line {
    /// Without calibration: CPUID above 20 × NOP is virtual (bare-metal CPUID costs a few
    /// NOP-measurements; a VM exit, tens to hundreds).
    pub const DEFAULT: Line = Line {
        intercept: 1.301_029_995_663_981_2,
        slope: 1.0,
    };

    /// The perpendicular bisector, in log space, of the native and the virtual clusters'
    /// centroids. `None` if the clusters coincide.
    pub fn between(native: &[RunPoint], virtual_runs: &[RunPoint]) -> Option<Self> {
        let centroid = |points: &[RunPoint]| {
            let n = points.len() as f64;
            let x = points.iter().map(|p| (p.nop_median.max(1) as f64).log10()).sum::<f64>() / n;
            let y = points
                .iter()
                .map(|p| (p.cpuid_median.max(1) as f64).log10())
                .sum::<f64>()
                / n;
            (x, y)
        };
        if native.is_empty() || virtual_runs.is_empty() {
            return None;
        }
        let (p, q) = (centroid(native), centroid(virtual_runs));
        let (dx, dy) = (q.0 - p.0, q.1 - p.1);
        if dy.abs() < 1e-9 {
            return None;
        }
        let mid = ((p.0 + q.0) / 2.0, (p.1 + q.1) / 2.0);
        let slope = -dx / dy;
        Some(Line {
            intercept: mid.1 - slope * mid.0,
            slope,
        })
    }

    /// log10(CPUID) above the line at this NOP, in decades.
    pub fn height_above(&self, nop: Cycles, cpuid: Cycles) -> f64 {
        (cpuid.max(1) as f64).log10() - (self.intercept + self.slope * (nop.max(1) as f64).log10())
    }

    /// The CPUID cost on the line at `nop` cycles.
    pub fn cpuid_at(&self, nop: f64) -> f64 {
        10f64.powf(self.intercept + self.slope * nop.max(1.0).log10())
    }
}

/// A calibration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub schema_version: u32,
    /// The host it was measured on (`null` for the built-in defaults).
    pub host: Option<HostInfo>,
    pub iterations: u32,
    pub native_runs: Vec<RunPoint>,
    /// hw-assist runs, where KVM was available: the virtual cluster of the seed line.
    pub virtual_runs: Vec<RunPoint>,
    pub seed_line: Line,
    pub robust_excess_p10_ns: Spread,
    pub robust_excess_median_ns: Spread,
    /// False for the built-in defaults.
    pub calibrated: bool,
}

impl Calibration {
    /// Documented defaults for an uncalibrated detector: bare-metal CPUID exceeds the
    /// measurement floor by ~100 ns (a few hundred cycles at a few GHz).
    pub fn uncalibrated() -> Self {
        Self {
            schema_version: CALIBRATION_SCHEMA,
            host: None,
            iterations: 0,
            native_runs: Vec::new(),
            virtual_runs: Vec::new(),
            seed_line: Line::DEFAULT,
            robust_excess_p10_ns: Spread { mean: 100.0, sd: 50.0 },
            robust_excess_median_ns: Spread { mean: 120.0, sd: 60.0 },
            calibrated: false,
        }
    }

    /// From native runs of this host and, where available, hw-assist runs.
    pub fn from_runs(host: HostInfo, iterations: u32, native: Vec<RunPoint>, virtual_runs: Vec<RunPoint>) -> Self {
        let p10: Vec<f64> = native.iter().map(|r| r.excess_p10_ns).collect();
        let median: Vec<f64> = native.iter().map(|r| r.excess_median_ns).collect();
        Self {
            schema_version: CALIBRATION_SCHEMA,
            host: Some(host),
            iterations,
            seed_line: Line::between(&native, &virtual_runs).unwrap_or(Line::DEFAULT),
            robust_excess_p10_ns: Spread::of(&p10),
            robust_excess_median_ns: Spread::of(&median),
            native_runs: native,
            virtual_runs,
            calibrated: true,
        }
    }

    pub fn load(path: &Path) -> Result<Self, CalibrationError> {
        let text = crate::input::read_text_capped(path, crate::input::MAX_CONFIG_BYTES).map_err(|source| {
            CalibrationError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::parse(&text, path)
    }

    /// A calibration from its text (`path` names it in messages), checked.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CalibrationError> {
        let calibration: Self = serde_json::from_str(text).map_err(|source| CalibrationError::Parse {
            path: path.to_owned(),
            source,
        })?;
        if calibration.schema_version != CALIBRATION_SCHEMA {
            return Err(CalibrationError::Schema {
                path: path.to_owned(),
                found: calibration.schema_version,
            });
        }
        if calibration.native_runs.is_empty() {
            return Err(CalibrationError::Empty { path: path.to_owned() });
        }
        calibration.check_values(path)?;
        Ok(calibration)
    }

    /// Every figure the rules divide by or compare with must be a number, and no spread
    /// negative: a hand-edited or corrupted file is refused, not believed.
    fn check_values(&self, path: &Path) -> Result<(), CalibrationError> {
        let mut figures = vec![
            ("seed_line.intercept", self.seed_line.intercept, false),
            ("seed_line.slope", self.seed_line.slope, false),
            ("robust_excess_p10_ns.mean", self.robust_excess_p10_ns.mean, false),
            ("robust_excess_p10_ns.sd", self.robust_excess_p10_ns.sd, true),
            ("robust_excess_median_ns.mean", self.robust_excess_median_ns.mean, false),
            ("robust_excess_median_ns.sd", self.robust_excess_median_ns.sd, true),
        ];
        for run in self.native_runs.iter().chain(&self.virtual_runs) {
            figures.push(("a run's excess_p10_ns", run.excess_p10_ns, false));
            figures.push(("a run's excess_median_ns", run.excess_median_ns, false));
        }
        // The line itself, where the rules read it: a finite intercept and slope can still
        // put CPUID at infinity (or zero) over the NOP costs a run can have.
        for nop in [1.0, 1e3, 1e6, 1e9] {
            figures.push(("seed_line's CPUID at a NOP cost", self.seed_line.cpuid_at(nop), false));
        }
        match figures.into_iter().find(|&(what, value, spread)| {
            !value.is_finite() || (spread && value < 0.0) || (what.ends_with("NOP cost") && value <= 0.0)
        }) {
            Some((what, value, _)) => Err(CalibrationError::Value {
                path: path.to_owned(),
                what,
                value,
            }),
            None => Ok(()),
        }
    }

    /// How the host it was measured on differs from `host`, in words; `None` if it is
    /// the same host, or the defaults (measured nowhere).
    pub fn other_host(&self, host: &HostInfo) -> Option<String> {
        let measured_on = self.host.as_ref().filter(|_| self.calibrated)?;
        host.differences_from(measured_on)
    }

    /// The file's text.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    /// Writes it atomically: the previous file stays until this one is whole.
    pub fn save(&self, path: &Path) -> Result<(), CalibrationError> {
        let text = self.to_json().map_err(|source| CalibrationError::Parse {
            path: path.to_owned(),
            source,
        })?;
        crate::output::write_atomically(path, text.as_bytes()).map_err(|source| CalibrationError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_host() -> HostInfo {
        serde_json::from_value(
            serde_json::json!({"cpu_model": "x", "is_vm": false, "tsc_khz": 2_000_000,
            "tsc_khz_source": "measured", "kvm": {"flavour": "unknown", "module": null, "api_version": null}}),
        )
        .unwrap()
    }

    #[test]
    fn another_hosts_calibration_is_told_and_the_defaults_are_not() {
        let calibration = Calibration::from_runs(test_host(), 10, vec![point(40, 200)], vec![]);
        assert_eq!(calibration.other_host(&test_host()), None);
        let mut here = test_host();
        here.cpu_model = "y".into();
        assert_eq!(calibration.other_host(&here).unwrap(), r#"CPU "x" there, "y" here"#);
        assert_eq!(Calibration::uncalibrated().other_host(&here), None);
    }

    fn point(nop: Cycles, cpuid: Cycles) -> RunPoint {
        RunPoint {
            nop_median: nop,
            cpuid_median: cpuid,
            excess_p10_ns: 0.0,
            excess_median_ns: 0.0,
        }
    }

    #[test]
    fn the_fitted_line_separates_the_clusters_it_was_fitted_on() {
        let native = [point(40, 150), point(45, 160), point(50, 170)];
        let virtual_runs = [point(45, 1_500), point(50, 1_800), point(40, 1_200)];
        let line = Line::between(&native, &virtual_runs).unwrap();
        assert!(native
            .iter()
            .all(|p| line.height_above(p.nop_median, p.cpuid_median) < 0.0));
        assert!(virtual_runs
            .iter()
            .all(|p| line.height_above(p.nop_median, p.cpuid_median) > 0.0));
    }

    #[test]
    fn the_default_line_is_cpuid_at_twenty_nops() {
        assert!((Line::DEFAULT.cpuid_at(50.0) - 1_000.0).abs() < 1e-6);
        assert!(Line::DEFAULT.height_above(50, 2_000) > 0.0);
        assert!(Line::DEFAULT.height_above(50, 500) < 0.0);
    }

    #[test]
    fn spread_is_the_sample_mean_and_sd() {
        let s = Spread::of(&[1.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.sd), (2.0, 1.0));
        assert_eq!(Spread::of(&[5.0]).sd, 0.0);
    }

    #[test]
    fn a_calibration_round_trips_through_its_file() {
        let calibration = Calibration::from_runs(test_host(), 100, vec![point(49, 2_300)], vec![point(11_000, 16_000)]);
        let path = std::env::temp_dir().join(format!("vmm-calibration-{}.json", std::process::id()));
        calibration.save(&path).unwrap();
        let back = Calibration::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(back, calibration);
        assert!(matches!(
            Calibration::load(Path::new("/nonexistent.json")),
            Err(CalibrationError::Read { .. })
        ));
    }

    #[test]
    fn non_finite_figures_and_negative_spreads_are_refused() {
        let good = Calibration::from_runs(test_host(), 10, vec![point(40, 200)], vec![]);
        assert!(good.check_values(Path::new("c.json")).is_ok());
        let mut nan = good.clone();
        nan.robust_excess_median_ns.mean = f64::NAN;
        assert!(matches!(
            nan.check_values(Path::new("c.json")),
            Err(CalibrationError::Value {
                what: "robust_excess_median_ns.mean",
                ..
            })
        ));
        let mut negative = good.clone();
        negative.robust_excess_p10_ns.sd = -3.0;
        assert!(negative.check_values(Path::new("c.json")).is_err());
        let mut infinite = good.clone();
        infinite.seed_line.slope = f64::INFINITY;
        assert!(infinite.check_values(Path::new("c.json")).is_err());
        // Finite figures, an infinite line: CPUID at NOP 10^9 is 10^(1e300 × 9).
        let mut steep = infinite.clone();
        steep.seed_line.slope = 1e300;
        assert!(steep.check_values(Path::new("c.json")).is_err());
    }
}
