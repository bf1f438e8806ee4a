//! Any bytes as a payload: refused with a reason or accepted, never a panic or an overflow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::vm::loader::{Payload, PayloadSource};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(payload) = Payload::from_bytes(bytes.to_vec(), PayloadSource::Generated("fuzz")) {
        // What reports and inspect read of an accepted payload must hold up too.
        let _ = payload.describe();
        let _ = payload.digest();
        for &site in &payload.cpuid_sites {
            let _ = payload.symbol_at(site);
        }
    }
});
