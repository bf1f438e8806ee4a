//! Any text as a validation matrix: parsed, checked, expanded into cells.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::validation::MatrixConfig;

fuzz_target!(|text: &str| {
    if let Ok(config) = MatrixConfig::parse(text, Path::new("fuzz.json")) {
        let _ = config.cells(2_445_406, Path::new("fuzz.json"));
    }
});
