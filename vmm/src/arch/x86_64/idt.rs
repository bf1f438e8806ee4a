//! A catch-all interrupt descriptor table: 32 gates, each to a stub that halts, so an
//! exception (or an interrupt nobody sent) in a vCPU that has no handlers of its own ends
//! in a `hlt` the VMM can read — which vector, at which RIP, with which error code —
//! instead of a triple fault, after which SVM leaves no registers to read.
//!
//! Vectors 32-255 lie past the table's limit: delivering one raises #GP with the vector
//! in its error code (IDT bit set; EXT set when it came from outside the instruction
//! stream), so 32 gates name every vector.

use super::gdt;

/// Gates in the table: the architectural exceptions.
pub const GATES: usize = 32;
/// Bytes per gate (a 64-bit interrupt gate).
const GATE_BYTES: usize = 16;
/// Bytes per stub: the counter's own `hlt; jmp $-1`, padded with a `nop`.
pub const STUB_BYTES: usize = 4;
const STUB: [u8; STUB_BYTES] = {
    let [hlt, jmp, back] = guest_payload::counter::HALT_CODE;
    [hlt, jmp, back, 0x90]
};
/// Bytes of the table.
pub const TABLE_BYTES: usize = GATES * GATE_BYTES;

/// The table, for a stub area at `stubs`: gate `v` points at `stubs + v * STUB_BYTES`.
pub fn table(stubs: u64) -> Vec<u8> {
    let selector = gdt::CODE_INDEX * 8;
    (0..GATES as u64)
        .flat_map(|vector| {
            let offset = stubs + vector * STUB_BYTES as u64;
            let mut gate = [0u8; GATE_BYTES];
            gate[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
            gate[2..4].copy_from_slice(&selector.to_le_bytes());
            gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
            gate[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
            gate[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
            gate
        })
        .collect()
}

/// The stubs: `hlt; jmp $-1; nop` per vector.
pub fn stubs() -> Vec<u8> {
    STUB.repeat(GATES)
}

/// Which vector's stub a vCPU halted in, from its RIP after the `hlt`.
pub fn vector_at(stubs: u64, rip: u64) -> Option<u8> {
    let offset = rip.checked_sub(stubs)?;
    let vector = offset / STUB_BYTES as u64;
    (vector < GATES as u64).then_some(vector as u8)
}

/// Whether the CPU pushes an error code for `vector`.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// An exception's mnemonic.
pub fn name(vector: u8) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE",
        "#DB",
        "NMI",
        "#BP",
        "#OF",
        "#BR",
        "#UD",
        "#NM",
        "#DF",
        "coprocessor overrun",
        "#TS",
        "#NP",
        "#SS",
        "#GP",
        "#PF",
        "reserved 15",
        "#MF",
        "#AC",
        "#MC",
        "#XM",
        "#VE",
        "#CP",
        "reserved 22",
        "reserved 23",
        "reserved 24",
        "reserved 25",
        "reserved 26",
        "reserved 27",
        "#HV",
        "#VC",
        "#SX",
        "reserved 31",
    ];
    NAMES.get(usize::from(vector)).copied().unwrap_or("interrupt")
}

/// What a halt in a stub says, from its vector, the error code (if it has one) and the
/// RIP the CPU pushed.
pub fn describe(vector: u8, error_code: Option<u64>, rip: u64) -> String {
    match error_code {
        // A #GP whose error code names a gate: a vector past the table's limit was delivered.
        Some(code) if vector == 13 && code & 2 != 0 => format!(
            "vector {:#x} ({}) at RIP {rip:#x}{}",
            code >> 3,
            if code >> 3 < GATES as u64 {
                name((code >> 3) as u8)
            } else {
                "an interrupt"
            },
            if code & 1 != 0 {
                ", delivered from outside the instruction stream"
            } else {
                ""
            }
        ),
        Some(code) => format!(
            "{} (vector {vector}) at RIP {rip:#x}, error code {code:#x}",
            name(vector)
        ),
        None => format!("{} (vector {vector}) at RIP {rip:#x}", name(vector)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gate_points_at_its_own_stub_with_the_code_selector() {
        let base = 0x7300;
        let table = table(base);
        assert_eq!(table.len(), TABLE_BYTES);
        for vector in [0usize, 13, 31] {
            let gate = &table[vector * GATE_BYTES..][..GATE_BYTES];
            let low = u16::from_le_bytes([gate[0], gate[1]]) as u64;
            let mid = u16::from_le_bytes([gate[6], gate[7]]) as u64;
            let high = u32::from_le_bytes(gate[8..12].try_into().unwrap()) as u64;
            let offset = low | mid << 16 | high << 32;
            assert_eq!(offset, base + (vector * STUB_BYTES) as u64);
            assert_eq!(u16::from_le_bytes([gate[2], gate[3]]), 8, "selector of GDT entry 1");
            assert_eq!(gate[5], 0x8e);
        }
        assert_eq!(stubs().len(), GATES * STUB_BYTES);
    }

    #[test]
    fn a_halt_in_a_stub_names_its_vector_and_nothing_else_does() {
        // RIP after the hlt: one past the stub's start.
        assert_eq!(vector_at(0x7300, 0x7300 + 13 * 4 + 1), Some(13));
        assert_eq!(vector_at(0x7300, 0x7300 + 1), Some(0));
        assert_eq!(vector_at(0x7300, 0x72ff), None);
        assert_eq!(vector_at(0x7300, 0x7300 + 32 * 4 + 1), None);
    }

    #[test]
    fn a_gp_naming_a_gate_past_the_limit_names_the_interrupt() {
        let text = describe(13, Some(0xec << 3 | 2 | 1), 0x7003);
        assert_eq!(
            text,
            "vector 0xec (an interrupt) at RIP 0x7003, delivered from outside the instruction stream"
        );
        assert_eq!(
            describe(13, Some(0), 0x7003),
            "#GP (vector 13) at RIP 0x7003, error code 0x0"
        );
        assert_eq!(describe(6, None, 0x7000), "#UD (vector 6) at RIP 0x7000");
        assert!(has_error_code(14) && !has_error_code(6));
    }
}
