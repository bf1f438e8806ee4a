//! Forged reports handed to `vmm merge`: any bytes as a report, and as a second report
//! beside a real shard, through the checks, the merge and every rendering — which must not
//! panic, and must never let a control character through to the terminal, a `|` or a
//! newline into a Markdown cell, nor a character XML forbids into the SVG.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::validation::records::ValidationInputs;
use vmm::validation::ValidationReport;

const SHARD: &str = include_str!("../seeds/validation_report/shard.json");

fuzz_target!(|text: &str| {
    let Ok(forged) = serde_json::from_str::<ValidationInputs>(text) else {
        return;
    };
    if vmm::validation::merge::check(&forged).is_err() {
        return;
    }
    let mut reports = vec![(std::path::PathBuf::from("forged.json"), forged)];
    if let Ok(shard) = serde_json::from_str::<ValidationInputs>(SHARD) {
        reports.push((std::path::PathBuf::from("shard.json"), shard));
    }
    for reports in [reports.clone(), reports.into_iter().rev().collect()] {
        let Ok(merged) = vmm::validation::merge::merge(reports) else {
            continue;
        };
        let report = ValidationReport::assemble(merged, &[]);
        let table = vmm::validation::render::table(&report).expect("a report renders");
        assert!(
            !table.chars().any(|c| c.is_control() && c != '\n'),
            "a control character reached the terminal"
        );
        let markdown = vmm::validation::render::markdown(&report).expect("a report renders");
        assert!(!markdown.chars().any(|c| c.is_control() && c != '\n'));
        let _ = vmm::validation::render::junit(&report);
        if let Ok(svg) = vmm::report::plot::render(&report.plot_runs(), &vmm::detector::Calibration::uncalibrated()) {
            assert!(!svg
                .chars()
                .any(|c| (c.is_control() && !matches!(c, '\n' | '\t' | '\r')) || c == '\u{fffe}' || c == '\u{ffff}'));
        }
    }
});
