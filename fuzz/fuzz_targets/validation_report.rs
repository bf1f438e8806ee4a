//! Any text as a validation report handed to `vmm merge`, and the report derived from it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::validation::records::ValidationInputs;
use vmm::validation::ValidationReport;

fuzz_target!(|text: &str| {
    if let Ok(inputs) = serde_json::from_str::<ValidationInputs>(text) {
        if vmm::validation::merge::check(&inputs).is_ok() {
            let report = ValidationReport::assemble(inputs, &[]);
            let _ = vmm::validation::render::table(&report);
            let _ = vmm::validation::render::markdown(&report);
            let _ = vmm::validation::render::junit(&report);
        }
    }
});
