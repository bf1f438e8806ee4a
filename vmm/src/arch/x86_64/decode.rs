//! x86-64 instruction decoding (iced-x86): where a payload's CPUIDs are, and what the
//! instruction a guest stopped at was, so a message can name it.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction};

/// The longest x86 instruction, in bytes.
pub const MAX_INSTRUCTION_BYTES: usize = 15;

/// The address of every CPUID instruction (`0f a2`) in `code`, which starts at `addr`,
/// found by decoding it from its first byte (a `0f a2` inside another instruction's
/// immediate is not a site).
pub fn cpuid_sites(code: &[u8], addr: u64) -> impl Iterator<Item = u64> + '_ {
    Decoder::with_ip(64, code, addr, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| i.code() == Code::Cpuid)
        .map(|i| i.ip())
}

/// The address of every RDTSC (`0f 31`) and every RDTSCP (`0f 01 f9`) in `code`, decoded
/// as [`cpuid_sites`] are.
pub fn tsc_sites(code: &[u8], addr: u64) -> (Vec<u64>, Vec<u64>) {
    let (mut rdtsc, mut rdtscp) = (Vec::new(), Vec::new());
    for i in Decoder::with_ip(64, code, addr, DecoderOptions::NONE) {
        match i.code() {
            Code::Rdtsc => rdtsc.push(i.ip()),
            Code::Rdtscp => rdtscp.push(i.ip()),
            _ => {}
        }
    }
    (rdtsc, rdtscp)
}

/// The first instruction of `bytes`, if they hold a valid one.
fn first(bytes: &[u8], ip: u64) -> Option<Instruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    (!instruction.is_invalid()).then_some(instruction)
}

/// The instruction at the start of `bytes` as a mnemonic and its bytes, e.g.
/// `rdtscp (0f 01 f9)`; `None` if they do not decode.
pub fn describe(bytes: &[u8], ip: u64) -> Option<String> {
    let instruction = first(bytes, ip)?;
    let encoded = &bytes[..instruction.len()];
    let hex: Vec<String> = encoded.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "{} ({})",
        format!("{:?}", instruction.mnemonic()).to_lowercase(),
        hex.join(" ")
    ))
}

/// The mnemonic of every instruction in `code`, lower case, in order (for tests of code
/// the VMM writes itself).
pub fn mnemonics(code: &[u8], addr: u64) -> Vec<String> {
    Decoder::with_ip(64, code, addr, DecoderOptions::NONE)
        .into_iter()
        .map(|i| format!("{:?}", i.mnemonic()).to_lowercase())
        .collect()
}

/// Is the instruction at the start of `bytes` RDTSCP?
pub fn is_rdtscp(bytes: &[u8]) -> bool {
    first(bytes, 0).is_some_and(|i| i.code() == Code::Rdtscp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_are_named_with_their_bytes() {
        assert_eq!(
            describe(&[0x0f, 0x01, 0xf9, 0x90], 0x1000).as_deref(),
            Some("rdtscp (0f 01 f9)")
        );
        assert_eq!(describe(&[0x0f, 0xa2], 0).as_deref(), Some("cpuid (0f a2)"));
        assert!(is_rdtscp(&[0x0f, 0x01, 0xf9]));
        assert!(!is_rdtscp(&[0x0f, 0x31]), "rdtsc is not rdtscp");
        assert_eq!(describe(&[0x0f], 0), None, "a truncated instruction");
        assert_eq!(describe(&[], 0), None);
    }
}
