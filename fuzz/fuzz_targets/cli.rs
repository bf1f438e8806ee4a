//! Any words as a command line: clap either parses them or says why.
#![no_main]
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use vmm::cli::Cli;

fuzz_target!(|text: &str| {
    let words = std::iter::once("vmm").chain(text.split(' '));
    let _ = Cli::try_parse_from(words);
});
