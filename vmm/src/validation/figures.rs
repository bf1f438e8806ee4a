//! The validation's figures as SVG: each rule's ROC on one plot (its own threshold marked
//! on its curve), each sweep's detection curves with their 95% intervals as bars, and the
//! detectors × evaders table of the arms race, a coloured cell each.

use super::report::{ArmsRace, Outcome};
use super::roc::Roc;
use super::sweep::Sweep;
use crate::report::plot::PALETTE;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

type DrawResult = Result<(), Box<dyn std::error::Error>>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Every figure's legend: lower right, over a white ground.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> DrawResult {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A label as SVG text may hold it.
fn label(text: &str) -> String {
    crate::escape::xml_text(text).into_owned()
}

/// Every rule's ROC curve on one plot, with the diagonal of a coin and each rule's own
/// threshold as a filled circle on its curve.
pub fn roc_svg(roc: &Roc) -> Result<String, String> {
    let mut svg = String::new();
    draw_roc(&mut svg, roc).map_err(|e| e.to_string())?;
    Ok(svg)
}

fn draw_roc(svg: &mut String, roc: &Roc) -> DrawResult {
    let root = SVGBackend::with_string(svg, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, plot) = root.split_vertically(70);
    title.draw(&Text::new(
        label(&format!("ROC per rule: {}", roc.negatives)),
        (10, 10),
        ("sans-serif", 14),
    ))?;
    title.draw(&Text::new(
        label(&format!("against {}", roc.positives)),
        (10, 35),
        ("sans-serif", 14),
    ))?;
    let mut chart = ChartBuilder::on(&plot)
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate (the first side flagged)")
        .y_desc("true positive rate (the second side flagged)")
        .draw()?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
    for (i, (rule, curve)) in roc.rules.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                curve.points.iter().map(|p| (p[0], p[1])),
                colour.stroke_width(2),
            ))?
            .label(label(&format!("{rule} (AUC {:.3})", curve.auc)))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
        let [x, y] = curve.operating;
        chart.draw_series([Circle::new((x, y), 6, colour.filled())])?;
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Each sweep's detection curves, one panel a sweep: the share flagged at each value,
/// its exact 95% interval as a bar.
pub fn sweeps_svg(sweeps: &[Sweep]) -> Result<String, String> {
    let mut svg = String::new();
    draw_sweeps(&mut svg, sweeps).map_err(|e| e.to_string())?;
    Ok(svg)
}

fn draw_sweeps(svg: &mut String, sweeps: &[Sweep]) -> DrawResult {
    let panel = 600;
    let height = u32::try_from(sweeps.len().max(1)).unwrap_or(1).saturating_mul(panel);
    let root = SVGBackend::with_string(svg, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((sweeps.len().max(1), 1));
    for (sweep, area) in sweeps.iter().zip(&panels) {
        let low = sweep.values.first().copied().unwrap_or(0) as f64;
        let high = sweep.values.last().copied().unwrap_or(1) as f64;
        let pad = ((high - low) / 20.0).max(1.0);
        let mut chart = ChartBuilder::on(area)
            .caption(
                label(&format!("{} swept on {}", sweep.swept, sweep.cells)),
                ("sans-serif", 16),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((low - pad)..(high + pad), -0.02..1.02)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc(label(&sweep.swept))
            .y_desc("share of runs flagged virtual")
            .draw()?;
        for (i, (rule, curve)) in sweep.rules.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            // Rules side by side within a step, so that equal rates stay readable.
            let nudge = pad * 0.1 * (i as f64 - sweep.rules.len() as f64 / 2.0);
            chart
                .draw_series(LineSeries::new(
                    curve.points.iter().map(|p| (p.value as f64 + nudge, p.rate)),
                    colour.stroke_width(2),
                ))?
                .label(label(rule))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
            chart.draw_series(
                curve
                    .points
                    .iter()
                    .map(|p| Circle::new((p.value as f64 + nudge, p.rate), 3, colour.filled())),
            )?;
            chart.draw_series(curve.points.iter().filter_map(|p| {
                let i = p.interval?;
                let x = p.value as f64 + nudge;
                Some(PathElement::new(
                    vec![(x, i.lower), (x, i.upper)],
                    colour.stroke_width(1),
                ))
            }))?;
        }
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// `text` in lines of at most `width` characters, each broken after the last `-`, `+`,
/// `:` or space that fits (mid-word only where none does).
fn wrapped(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rest: Vec<char> = text.chars().collect();
    while rest.len() > width {
        let cut = rest[..width]
            .iter()
            .rposition(|c| matches!(c, '-' | '+' | ':' | ' '))
            .map_or(width, |at| at + 1);
        lines.push(rest[..cut].iter().collect::<String>().trim_end().to_owned());
        rest.drain(..cut);
    }
    lines.push(rest.into_iter().collect());
    lines
}

/// The colour of an outcome in the arms-race table.
fn outcome_colour(outcome: Option<Outcome>) -> RGBColor {
    match outcome {
        Some(Outcome::Caught) => RGBColor(46, 160, 67),
        Some(Outcome::Fooled) => RGBColor(215, 58, 73),
        Some(Outcome::FalseAlarm) => RGBColor(240, 140, 0),
        Some(Outcome::Quiet) => RGBColor(190, 230, 190),
        Some(Outcome::Unsure) => RGBColor(200, 200, 200),
        None => WHITE,
    }
}

/// The arms race as a table: a row per detector (`rules`, in report order), a column per
/// thing staged, each cell coloured by its outcome and labelled with it and the share of
/// runs flagged virtual; "not applicable" where the rule judged none of the column's runs.
pub fn arms_race_svg(race: &ArmsRace, rules: &[&str]) -> Result<String, String> {
    let mut svg = String::new();
    draw_arms_race(&mut svg, race, rules).map_err(|e| e.to_string())?;
    Ok(svg)
}

fn draw_arms_race(svg: &mut String, race: &ArmsRace, rules: &[&str]) -> DrawResult {
    const LEFT: i32 = 170;
    const TOP: i32 = 90;
    const WIDTH: i32 = 122;
    const HEIGHT: i32 = 24;
    let rows: Vec<&str> = rules.iter().copied().filter(|r| race.cells.contains_key(*r)).collect();
    let size = (
        (LEFT + WIDTH * race.columns.len() as i32 + 10) as u32,
        (TOP + HEIGHT * rows.len() as i32 + 70) as u32,
    );
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        "Detectors × evaders: what each rule made of each column (majority of its runs; share flagged virtual)",
        (10, 8),
        ("sans-serif", 14),
    ))?;
    for (c, column) in race.columns.iter().enumerate() {
        let x = LEFT + WIDTH * c as i32 + 4;
        // The column's name in lines of about 18 characters, broken after a `-`, `+`, `:`
        // or space where one falls, and its truth.
        let name = format!("{} [{}]", column.arms, column.truth.name());
        for (line, text) in wrapped(&name, 18).iter().take(3).enumerate() {
            root.draw(&Text::new(label(text), (x, 32 + 16 * line as i32), ("sans-serif", 11)))?;
        }
    }
    for (r, rule) in rows.iter().enumerate() {
        let y = TOP + HEIGHT * r as i32;
        root.draw(&Text::new(label(rule), (6, y + 6), ("sans-serif", 12)))?;
        let cells = &race.cells[*rule];
        for c in 0..race.columns.len() {
            let x = LEFT + WIDTH * c as i32;
            let cell = cells.get(c).and_then(Option::as_ref);
            root.draw(&Rectangle::new(
                [(x, y), (x + WIDTH - 2, y + HEIGHT - 2)],
                outcome_colour(cell.map(|c| c.outcome)).filled(),
            ))?;
            root.draw(&Rectangle::new(
                [(x, y), (x + WIDTH - 2, y + HEIGHT - 2)],
                BLACK.mix(0.3),
            ))?;
            let text = match cell {
                Some(cell) => format!(
                    "{} {:.2}",
                    cell.outcome.name(),
                    f64::from(cell.flagged) / f64::from(cell.runs.max(1))
                ),
                None => "not applicable".into(),
            };
            root.draw(&Text::new(label(&text), (x + 5, y + 6), ("sans-serif", 11)))?;
        }
    }
    let legend_y = TOP + HEIGHT * rows.len() as i32 + 16;
    let mut x = 10;
    for (outcome, what) in [
        (Some(Outcome::Caught), "caught: a VM called virtual"),
        (Some(Outcome::Fooled), "fooled: a VM called native"),
        (Some(Outcome::FalseAlarm), "false alarm: a host called virtual"),
        (Some(Outcome::Quiet), "quiet: a host called native"),
        (Some(Outcome::Unsure), "unsure"),
    ] {
        root.draw(&Rectangle::new(
            [(x, legend_y), (x + 14, legend_y + 14)],
            outcome_colour(outcome).filled(),
        ))?;
        root.draw(&Text::new(label(what), (x + 18, legend_y + 1), ("sans-serif", 11)))?;
        x += 18 + 7 * what.len() as i32 + 20;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::plot::svg_texts;
    use crate::validation::roc::RuleRoc;

    #[test]
    fn the_roc_plot_names_each_rule_with_its_auc_and_marks_its_threshold() {
        let roc = Roc {
            negatives: "hosts".into(),
            positives: "VMs <all>".into(),
            rules: [(
                "robust".to_owned(),
                RuleRoc {
                    negatives: 3,
                    positives: 2,
                    auc: 0.75,
                    points: vec![[0.0, 0.0], [0.0, 0.5], [1.0, 1.0]],
                    operating: [0.0, 0.5],
                },
            )]
            .into(),
        };
        let svg = roc_svg(&roc).unwrap();
        let texts = svg_texts(&svg);
        assert!(texts.iter().any(|t| t == "robust (AUC 0.750)"), "{texts:?}");
        assert!(
            texts.iter().any(|t| t.contains("VMs &lt;all&gt;")),
            "escaped: {texts:?}"
        );
        assert_eq!(svg.matches("<circle").count(), 1, "one threshold marked");
    }

    #[test]
    fn column_names_break_after_separators() {
        assert_eq!(
            wrapped("hypervisor-phantom-nika [virtual]", 18),
            ["hypervisor-", "phantom-nika ", "[virtual]"].map(|s| s.trim_end().to_owned())
        );
        assert_eq!(wrapped("none [virtual]", 18), ["none [virtual]"]);
        assert_eq!(
            wrapped("abcdefghijklmnopqrstuvwxyz", 10),
            ["abcdefghij", "klmnopqrst", "uvwxyz"]
        );
    }

    #[test]
    fn the_arms_race_table_colours_each_outcome_and_names_the_cells_not_judged() {
        use crate::detector::Verdict;
        use crate::validation::report::{ArmsCell, ArmsColumn};
        let cell = |outcome, flagged| {
            Some(ArmsCell {
                outcome,
                flagged,
                unsure: 0,
                runs: 3,
                evidence: "why".into(),
            })
        };
        let race = ArmsRace {
            columns: vec![
                ArmsColumn {
                    arms: "none".into(),
                    truth: Verdict::Virtual,
                    runs: 3,
                },
                ArmsColumn {
                    arms: "none+bettertiming".into(),
                    truth: Verdict::Virtual,
                    runs: 3,
                },
            ],
            rules: Default::default(),
            cells: [
                (
                    "tsc-pm-cpuid".to_owned(),
                    vec![cell(Outcome::Quiet, 0), cell(Outcome::Caught, 3)],
                ),
                ("counter-tsc".to_owned(), vec![None, cell(Outcome::Fooled, 0)]),
            ]
            .into(),
        };
        let svg = arms_race_svg(&race, &["counter-tsc", "tsc-pm-cpuid", "absent"]).unwrap();
        let texts = svg_texts(&svg);
        for text in [
            "caught 1.00",
            "fooled 0.00",
            "quiet 0.00",
            "not applicable",
            "tsc-pm-cpuid",
            "counter-tsc",
        ] {
            assert!(texts.iter().any(|t| t == text), "{text}: {texts:?}");
        }
        assert!(!texts.iter().any(|t| t == "absent"), "a rule with no cells is no row");
        assert!(
            svg.contains("rgb(46,160,67)") || svg.contains("#2EA043"),
            "caught is green"
        );
    }
}
