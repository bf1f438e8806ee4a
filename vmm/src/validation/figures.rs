//! The validation's curves as SVG: each rule's ROC on one plot (its own threshold marked
//! on its curve), and each sweep's detection curves with their 95% intervals as bars.

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
}
