//! Any text as a calibration file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::detector::Calibration;

fuzz_target!(|text: &str| {
    let _ = Calibration::parse(text, Path::new("fuzz.json"));
});
