//! Identity-mapping page tables: the first GiB of guest-physical memory mapped at the same
//! virtual addresses with 2 MiB pages, so the payload can use physical addresses as pointers.

use guest_payload::layout::{IDENTITY_MAP_BYTES, PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE_PAGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;

/// The three tables, each 512 entries: (guest address, entries).
pub fn identity_tables() -> [(u64, Vec<u64>); 3] {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_ADDR | PRESENT | WRITABLE;
    let mut pdpt = vec![0u64; 512];
    pdpt[0] = PD_ADDR | PRESENT | WRITABLE;
    let pages = (IDENTITY_MAP_BYTES / TWO_MIB) as usize;
    let pd = (0..512)
        .map(|i| {
            if i < pages {
                (i as u64 * TWO_MIB) | PRESENT | WRITABLE | HUGE_PAGE
            } else {
                0
            }
        })
        .collect();
    [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pd)]
}

/// The address CR3 must hold.
pub const fn root() -> u64 {
    PML4_ADDR
}

/// Walks the tables the way the CPU does, for tests: virtual address to physical.
pub fn translate(tables: &[(u64, Vec<u64>)], virtual_address: u64) -> Option<u64> {
    let lookup = |table: u64, index: u64| -> Option<u64> {
        let (_, entries) = tables.iter().find(|(addr, _)| *addr == table)?;
        let entry = entries[index as usize];
        (entry & PRESENT != 0).then_some(entry)
    };
    let pml4e = lookup(root(), (virtual_address >> 39) & 0x1ff)?;
    let pdpte = lookup(pml4e & !0xfff, (virtual_address >> 30) & 0x1ff)?;
    let pde = lookup(pdpte & !0xfff, (virtual_address >> 21) & 0x1ff)?;
    (pde & HUGE_PAGE != 0).then_some((pde & !(TWO_MIB - 1) & !(1 << 63)) | (virtual_address & (TWO_MIB - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_gigabyte_is_identity_mapped_and_nothing_beyond() {
        let tables = identity_tables();
        for address in [0, 0x1234, 0x10_0000, 0x40_0000 + 17, IDENTITY_MAP_BYTES - 1] {
            assert_eq!(translate(&tables, address), Some(address));
        }
        assert_eq!(translate(&tables, IDENTITY_MAP_BYTES), None);
    }
}
