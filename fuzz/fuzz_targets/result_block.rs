//! Any bytes as the result block a guest (or a native twin) wrote.
#![no_main]
use guest_payload::{Config, Probe, ABI_VERSION, CONFIG_MAGIC};
use libfuzzer_sys::fuzz_target;
use vmm::results::{parse_results, ResultsError};

fuzz_target!(|bytes: &[u8]| {
    let config = Config {
        magic: CONFIG_MAGIC,
        abi_version: ABI_VERSION,
        iterations: 16,
        probes: Probe::ALL.iter().map(|p| p.bit()).sum(),
        result_capacity: bytes.len() as u64,
        // Half the inputs as runs with a counter vCPU: tick counts may follow the samples.
        counter_addr: if bytes.len() % 2 == 1 { guest_payload::layout::COUNTER_BLOCK_ADDR } else { 0 },
        ..Default::default()
    };
    let _ = parse_results(&config, |offset, len| {
        let start = usize::try_from(offset).map_err(|_| ResultsError::Invalid("offset"))?;
        start
            .checked_add(len)
            .and_then(|end| bytes.get(start..end))
            .map(<[u8]>::to_vec)
            .ok_or(ResultsError::Invalid("short"))
    });
});
