//! `vmm calibrate`: native runs of this host (and hw-assist runs, where KVM is there, for
//! the seed line's virtual cluster), saved for the detector rules.

use super::{load_calibration, CommandError};
use crate::cli::CalibrateArgs;
use crate::detector::calibration::{Calibration, RunPoint};
use crate::experiment::Session;
use crate::measure::RunSpec;
use crate::modes::Path;
use crate::vm::loader::Payload;
use indicatif::{ProgressBar, ProgressStyle};

pub fn calibrate(args: &CalibrateArgs) -> Result<(), CommandError> {
    // Fail on an unwritable path now, not after the runs; the old file stays until the end.
    let output = super::create_output(Some(&args.out))?;
    crate::interrupt::catch();
    let session = Session::open(Payload::embedded()?, load_calibration(None)?);
    let mut modes = vec![Path::Native];
    if !args.native_only && session.measurer.kvm().is_ok() {
        modes.push(Path::HwAssist);
    }
    let progress = progress_bar(u64::from(args.runs) * modes.len() as u64, "calibrating");
    let mut points = [Vec::new(), Vec::new()];
    for (i, &mode) in modes.iter().enumerate() {
        let spec = RunSpec {
            iterations: args.iterations,
            ..RunSpec::new(mode)
        };
        for _ in 0..args.runs {
            if let Some(signal) = crate::interrupt::caught() {
                return Err(CommandError::Interrupted {
                    signal,
                    done: format!(
                        "{} runs measured; a calibration of fewer runs than asked is not written, and {} is as it was",
                        points.iter().map(Vec::len).sum::<usize>(),
                        args.out.display()
                    ),
                });
            }
            let (report, measurement) = session.run(&spec, false, None)?;
            if let Some(point) = RunPoint::from_samples(&measurement.results.samples, report.host.tsc_khz) {
                points[i].push(point);
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let [native, virtual_runs] = points;
    let host = session.host.clone();
    let calibration = Calibration::from_runs(host, args.iterations, native, virtual_runs);
    if let Some(output) = output {
        super::commit(output, calibration.to_json()?.as_bytes())?;
    }
    let p10 = calibration.robust_excess_p10_ns;
    super::print(&format!(
        "calibration written to {}: {} native runs (CPUID over the floor, p10: {:.0} ± {:.0} ns), {} hw-assist runs; seed line log10(CPUID) = {:.3} + {:.3} × log10(NOP)\n",
        args.out.display(),
        calibration.native_runs.len(),
        p10.mean,
        p10.sd,
        calibration.virtual_runs.len(),
        calibration.seed_line.intercept,
        calibration.seed_line.slope,
    ))?;
    Ok(())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} runs, {elapsed} elapsed, ~{eta} left")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what);
    bar
}
