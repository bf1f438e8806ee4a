//! SVG plots: the runs as points on the (NOP, CPUID) plane, coloured by mode, with each
//! timing rule's dividing line — the seed article's graph — and below it a histogram of
//! CPUID cost per mode on a log axis.

use crate::detector::rules::{robust_virtual_excess_ns, FIXED_THRESHOLD_CYCLES, LFENCE_RATIO_VIRTUAL};
use crate::detector::Calibration;
use crate::output::Output;
use crate::results::ProbeSamples;
use crate::stats;
use guest_payload::{Cycles, Probe};
use plotters::prelude::*;

/// One run, as the plot needs it.
#[derive(Clone, Debug)]
pub struct PlotRun {
    pub label: String,
    pub nop_median: Cycles,
    pub cpuid_median: Cycles,
    pub floor_median: Cycles,
    pub lfence8_median: Option<Cycles>,
    pub cpuid: Vec<Cycles>,
    /// The run's TSC rate, to put ns thresholds on a cycles axis.
    pub tsc_khz: u32,
}

impl PlotRun {
    pub fn new(label: &str, samples: &ProbeSamples, tsc_khz: u32) -> Self {
        let median = |p: Probe| samples.get(&p).map(|s| stats::median(s));
        let nop = median(Probe::Nop).unwrap_or(1);
        Self {
            label: label.to_owned(),
            nop_median: nop,
            cpuid_median: median(Probe::Cpuid).unwrap_or(1),
            floor_median: median(Probe::Rdtsc).unwrap_or(nop),
            lfence8_median: median(Probe::Lfence8),
            cpuid: samples.get(&Probe::Cpuid).cloned().unwrap_or_default(),
            tsc_khz,
        }
    }
}

/// The colours of plotted series, in order (the validation's figures use them too).
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {path}: {why}")]
    Draw { path: String, why: String },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Writes the SVG to `output` (prepared before any run, so a bad path failed then).
pub fn write(output: Output, runs: &[PlotRun], calibration: &Calibration) -> Result<(), PlotError> {
    let path = output.path().display().to_string();
    let svg = match render(runs, calibration) {
        Ok(svg) => svg,
        Err(why) => return Err(PlotError::Draw { path, why }),
    };
    output
        .commit(svg.as_bytes())
        .map_err(|source| PlotError::Write { path, source })
}

/// The labels in order of first appearance, each with its colour and its runs (grouped in
/// one pass: linear in runs however many labels a merged report brings). Labels are made
/// safe for XML: a control character in a forged report's mode would make the SVG invalid.
fn colours(runs: &[PlotRun]) -> Vec<(String, RGBColor, Vec<&PlotRun>)> {
    let mut groups: Vec<(String, RGBColor, Vec<&PlotRun>)> = Vec::new();
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for run in runs {
        let at = *index.entry(run.label.as_str()).or_insert_with(|| {
            let colour = PALETTE[groups.len() % PALETTE.len()];
            groups.push((crate::escape::xml_text(&run.label).into_owned(), colour, Vec::new()));
            groups.len() - 1
        });
        groups[at].2.push(run);
    }
    groups
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1.0, 10.0);
    }
    ((lo / 2.0).max(1.0), (hi * 2.0).max(lo * 4.0).max(10.0))
}

/// [`bounds`] widened to whole decades, so that a narrow range (NOP at 25–49 cycles under
/// a nested KVM) still has labelled ticks, and the legend room above the points.
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = bounds(values);
    (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()))
}

/// The SVG text. Run points are circles; legend markers are squares, so the points can be
/// counted.
pub fn render(runs: &[PlotRun], calibration: &Calibration) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 1200)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(700);
        scatter(&top, runs, calibration).map_err(|e| e.to_string())?;
        histogram(&bottom, runs).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn scatter(area: &Area, runs: &[PlotRun], calibration: &Calibration) -> DrawResult {
    let (x_lo, x_hi) = decades(runs.iter().map(|r| r.nop_median.max(1) as f64));
    let (y_lo, y_hi) = decades(
        runs.iter()
            .map(|r| r.cpuid_median.max(1) as f64)
            .chain([FIXED_THRESHOLD_CYCLES]),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Runs on the (NOP, CPUID) plane, with each timing rule's line",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("NOP median (TSC cycles, log)")
        .y_desc("CPUID median (TSC cycles, log)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;

    let xs: Vec<f64> = (0..=100)
        .map(|i| x_lo * (x_hi / x_lo).powf(f64::from(i) / 100.0))
        .collect();
    let line = calibration.seed_line;
    let seed_label = if calibration.calibrated {
        "seed-line (calibrated)"
    } else {
        "seed-line (default: 20 × NOP)"
    };
    chart
        .draw_series(LineSeries::new(
            // Only the part of the line inside the plot: clamping would draw false flats.
            xs.iter()
                .map(|&x| (x, line.cpuid_at(x)))
                .filter(|&(_, y)| (y_lo..=y_hi).contains(&y)),
            BLACK.stroke_width(2),
        ))?
        .label(seed_label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let horizontal = |y: f64| [(x_lo, y), (x_hi, y)];
    chart
        .draw_series(LineSeries::new(
            horizontal(FIXED_THRESHOLD_CYCLES),
            RGBColor(120, 120, 120).stroke_width(2),
        ))?
        .label(format!("fixed-threshold (mean {FIXED_THRESHOLD_CYCLES})"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(120, 120, 120).stroke_width(2)));
    let lfences: Vec<Cycles> = runs.iter().filter_map(|r| r.lfence8_median).collect();
    if !lfences.is_empty() {
        let y = LFENCE_RATIO_VIRTUAL * stats::median(&lfences) as f64;
        chart
            .draw_series(DashedLineSeries::new(
                horizontal(y.clamp(y_lo, y_hi)),
                8,
                4,
                RGBColor(200, 120, 0).stroke_width(2),
            ))?
            .label(format!("tsc-lfence-ratio ({LFENCE_RATIO_VIRTUAL} × 8 LFENCE)"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(200, 120, 0).stroke_width(2)));
    }
    let floors: Vec<Cycles> = runs.iter().map(|r| r.floor_median).collect();
    if !floors.is_empty() {
        // robust's threshold is in ns over the floor; the runs' TSC rate puts it in cycles.
        let khz: Vec<u64> = runs.iter().map(|r| u64::from(r.tsc_khz)).collect();
        let y =
            stats::median(&floors) as f64 + robust_virtual_excess_ns(calibration) * stats::median(&khz) as f64 / 1e6;
        chart
            .draw_series(DashedLineSeries::new(
                horizontal(y.clamp(y_lo, y_hi)),
                3,
                3,
                RGBColor(0, 128, 128).stroke_width(2),
            ))?
            .label("robust (floor + its virtual threshold)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(0, 128, 128).stroke_width(2)));
    }
    for (label, colour, of_label) in colours(runs) {
        let of_label = || of_label.iter();
        // A median at or below zero (a TSC run backwards) has no place on a log axis:
        // counted in the legend, never drawn as if it were a tiny cost.
        let points: Vec<(f64, f64)> = of_label()
            .filter(|r| r.nop_median > 0 && r.cpuid_median > 0)
            .map(|r| (r.nop_median as f64, r.cpuid_median as f64))
            .collect();
        let undrawn = of_label().count() - points.len();
        let label = if undrawn > 0 {
            format!("{label} ({undrawn} runs with a median at or below zero, not drawn)")
        } else {
            label
        };
        chart
            .draw_series(points.into_iter().map(move |p| Circle::new(p, 5, colour.filled())))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x + 5, y - 5), (x + 15, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

fn histogram(area: &Area, runs: &[PlotRun]) -> DrawResult {
    const BINS: usize = 60;
    // A log axis has no room for samples that ran backwards: they are counted in the
    // legend instead, never drawn as if they were tiny positive costs.
    let all = runs
        .iter()
        .flat_map(|r| r.cpuid.iter().filter(|&&c| c > 0).map(|&c| c as f64));
    let (lo, hi) = bounds(all);
    let edge = |i: usize| lo * (hi / lo).powf(i as f64 / BINS as f64);
    let mut series = Vec::new();
    let mut y_max = 1.0f64;
    for (label, colour, of_label) in colours(runs) {
        let mut counts = vec![0u64; BINS];
        let mut total = 0u64;
        let mut backwards = 0u64;
        for run in of_label {
            for &c in &run.cpuid {
                if c <= 0 {
                    backwards += u64::from(c < 0);
                    continue;
                }
                let position = ((c.max(1) as f64 / lo).ln() / (hi / lo).ln() * BINS as f64) as usize;
                counts[position.min(BINS - 1)] += 1;
                total += 1;
            }
        }
        let fractions: Vec<f64> = counts.iter().map(|&c| c as f64 / total.max(1) as f64 * 100.0).collect();
        y_max = fractions.iter().copied().fold(y_max, f64::max);
        let label = if backwards > 0 {
            format!("{label} ({backwards} samples ran backwards, not drawn)")
        } else {
            label
        };
        series.push((label, colour, fractions));
    }
    let mut chart = ChartBuilder::on(area)
        .caption("CPUID cost per mode", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..y_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("CPUID sample (TSC cycles, log)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("% of the mode's samples")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (label, colour, fractions) in series {
        let steps = fractions
            .iter()
            .enumerate()
            .flat_map(|(i, &f)| [(edge(i), f), (edge(i + 1), f)]);
        chart
            .draw_series(LineSeries::new(steps, colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x + 5, y - 5), (x + 15, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// The text of every `<text>` element of an SVG, trimmed: what a reader sees written.
pub fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|element| {
            let body = &element[element.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, nop: Cycles, cpuid: Cycles) -> PlotRun {
        PlotRun {
            label: label.into(),
            nop_median: nop,
            cpuid_median: cpuid,
            floor_median: nop,
            lfence8_median: Some(nop * 3),
            cpuid: vec![cpuid; 50],
            tsc_khz: 2_500_000,
        }
    }

    #[test]
    fn a_narrow_range_still_spans_whole_decades() {
        // NOP 25–49 (nested): 12.5..98 would label no tick; whole decades label two.
        assert_eq!(decades([25.0, 49.0].into_iter()), (10.0, 100.0));
        assert_eq!(decades([15_000.0, 230_000.0].into_iter()), (1_000.0, 1_000_000.0));
        assert_eq!(decades(std::iter::empty()), (1.0, 10.0));
    }

    #[test]
    fn one_point_per_run_and_the_legend_names_each_mode() {
        let runs = [
            run("native", 49, 2_300),
            run("native", 50, 2_400),
            run("hw-assist", 11_000, 16_000),
            run("paravirt", 12_000, 38_000),
        ];
        let svg = render(&runs, &Calibration::uncalibrated()).unwrap();
        assert_eq!(svg.matches("<circle").count(), runs.len());
        let texts = svg_texts(&svg);
        for mode in ["native", "hw-assist", "paravirt"] {
            // Once in each legend: the scatter's and the histogram's.
            assert_eq!(
                texts.iter().filter(|t| *t == mode).count(),
                2,
                "legends lack {mode}: {texts:?}"
            );
        }
        assert!(svg.contains("seed-line"));
        assert!(svg.contains("NOP median"));
    }

    #[test]
    fn runs_whose_tsc_ran_backwards_are_counted_not_drawn_as_cheap() {
        let mut backwards = run("hide", 40, -12_974);
        backwards.cpuid = vec![-12_974, 80, -5, 90];
        let runs = [run("native", 49, 2_300), backwards];
        let svg = render(&runs, &Calibration::uncalibrated()).unwrap();
        assert_eq!(
            svg.matches("<circle").count(),
            1,
            "only the native run has a place on the log axes"
        );
        let texts = svg_texts(&svg);
        assert!(
            texts
                .iter()
                .any(|t| t.contains("1 runs with a median at or below zero, not drawn")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.contains("2 samples ran backwards, not drawn")),
            "{texts:?}"
        );
    }
}
