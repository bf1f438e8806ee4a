//! The global descriptor table: a null entry, one 64-bit code segment, one data segment.
//!
//! Long mode ignores most of a descriptor, but KVM checks that the hidden segment state in
//! `kvm_sregs` agrees with the descriptors, so both are derived from the same entries.

use kvm_bindings::kvm_segment;

/// Selector index of the code segment.
pub const CODE_INDEX: u16 = 1;
/// Selector index of the data segment (also used for the stack).
pub const DATA_INDEX: u16 = 2;

/// Descriptor flags: present, DPL 0, code, execute/read, accessed; granularity 4 KiB, L=1.
const CODE_FLAGS: u16 = 0xa09b;
/// Descriptor flags: present, DPL 0, data, read/write, accessed; granularity 4 KiB, D/B=1.
const DATA_FLAGS: u16 = 0xc093;

/// The table, as the guest reads it.
pub fn table() -> [u64; 3] {
    [
        0,
        descriptor(CODE_FLAGS, 0, 0xfffff),
        descriptor(DATA_FLAGS, 0, 0xfffff),
    ]
}

/// Encodes a segment descriptor from its flags word, base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden segment-register state KVM expects for the descriptor at `index`.
pub fn segment(table: &[u64], index: u16) -> kvm_segment {
    let entry = table[usize::from(index)];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages: the byte limit ends in 0xfff.
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_descriptor_is_the_canonical_64bit_ring0_segment() {
        assert_eq!(table()[CODE_INDEX as usize], 0x00af_9b00_0000_ffff);
        assert_eq!(table()[DATA_INDEX as usize], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn segment_state_matches_its_descriptor() {
        let code = segment(&table(), CODE_INDEX);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.present, code.s),
            (8, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment(&table(), DATA_INDEX);
        assert_eq!((data.selector, data.type_, data.l, data.db), (16, 0x3, 0, 1));
    }
}
