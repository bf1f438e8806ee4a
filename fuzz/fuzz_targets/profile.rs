//! Any text as a latency profile, and draws from it when accepted.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vmm::shaping::profile::Profile;
use vmm::stats::SplitMix64;

fuzz_target!(|text: &str| {
    if let Ok(profile) = Profile::parse(text, Path::new("fuzz.json")) {
        let mut rng = SplitMix64::new(1);
        for _ in 0..16 {
            let _ = profile.distribution.sample(&mut rng);
        }
        let _ = profile.distribution.median();
    }
});
