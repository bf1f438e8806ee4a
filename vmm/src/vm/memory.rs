//! Guest RAM: sized from the samples asked for, and the boot structures written into it.

use crate::arch::x86_64::{gdt, paging};
use guest_payload::layout::{GDT_ADDR, IDENTITY_MAP_BYTES, RAM_GRANULE, RESULT_ADDR};
use guest_payload::{layout, Config};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("the samples asked for need {needed} bytes of guest RAM, more than the {limit} bytes the page tables map; ask for fewer iterations")]
    TooLarge { needed: u64, limit: u64 },
    #[error("--misbehave mmio reads guest address {addr:#x}, and this run's {size} bytes of RAM cover it (the read would succeed): ask for fewer iterations")]
    StrayCovered { addr: u64, size: u64 },
    #[error("cannot allocate {size} bytes of guest RAM: {source}")]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot write {what} at guest address {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot read the result block at guest address {addr:#x}: {source}")]
    Read {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Bytes of guest RAM for a run: everything below the result area, plus the result block
/// the config asks for, rounded up to whole 2 MiB pages.
pub fn ram_size_for(config: &Config) -> Result<u64, MemoryError> {
    let needed = RESULT_ADDR + config.result_bytes_needed();
    let size = needed.div_ceil(RAM_GRANULE) * RAM_GRANULE;
    if size > IDENTITY_MAP_BYTES {
        return Err(MemoryError::TooLarge {
            needed,
            limit: IDENTITY_MAP_BYTES,
        });
    }
    if config.flags & guest_payload::flags::STRAY_MMIO != 0 && size > layout::STRAY_MMIO_ADDR {
        return Err(MemoryError::StrayCovered {
            addr: layout::STRAY_MMIO_ADDR,
            size,
        });
    }
    Ok(size)
}

/// Bytes a payload may write at the result address: the rest of the guest's RAM. A native
/// twin gets the same, so a payload that measures its own counts fits both or neither.
pub fn result_capacity_for(config: &Config) -> Result<u64, MemoryError> {
    Ok(ram_size_for(config)? - RESULT_ADDR)
}

/// One anonymous mapping from guest address 0. The kernel hands it out zeroed, which is
/// also what gives the payload a zeroed `.bss` (the ELF loader copies only file bytes).
pub fn allocate(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Allocate { size, source })?;
    // Guest RAM stays out of core dumps: it is the guest's, and it can be a gigabyte.
    for region in memory.iter() {
        // SAFETY: the range is the region's own live mapping; MADV_DONTDUMP only marks it.
        unsafe {
            libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_DONTDUMP);
        }
    }
    Ok(memory)
}

/// Writes the GDT, the page tables and the config block.
pub fn write_boot_structures(memory: &GuestMemoryMmap, config: &Config) -> Result<(), MemoryError> {
    let gdt: Vec<u8> = gdt::table().iter().flat_map(|d| d.to_le_bytes()).collect();
    write(memory, "the GDT", GDT_ADDR, &gdt)?;
    for (addr, entries) in paging::identity_tables() {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        write(memory, "a page table", addr, &bytes)?;
    }
    write(memory, "the config block", layout::CONFIG_ADDR, config.as_bytes())
}

pub fn write(memory: &GuestMemoryMmap, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), MemoryError> {
    memory
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|source| MemoryError::Write { what, addr, source })
}

/// Copies `len` bytes out of guest RAM.
pub fn read(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
    let mut bytes = vec![0u8; len];
    memory
        .read_slice(&mut bytes, GuestAddress(addr))
        .map_err(|source| MemoryError::Read { addr, source })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {

    #[test]
    fn guest_ram_is_kept_out_of_core_dumps() {
        let memory = allocate(2 << 20).unwrap();
        let start = memory.iter().next().unwrap().as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let mut flags = None;
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((from, _)) = range.split_once('-') else {
                continue;
            };
            if usize::from_str_radix(from, 16) == Ok(start) {
                flags = lines.by_ref().find(|l| l.starts_with("VmFlags:")).map(str::to_owned);
                break;
            }
        }
        let flags = flags.expect("the mapping is in smaps");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
    }

    use super::*;

    #[test]
    fn a_stray_read_is_refused_where_ram_would_answer_it() {
        let stray = |iterations| Config {
            probes: 0b11111,
            iterations,
            flags: guest_payload::flags::STRAY_MMIO,
            ..Default::default()
        };
        assert!(ram_size_for(&stray(10_000)).unwrap() <= layout::STRAY_MMIO_ADDR);
        assert!(matches!(
            ram_size_for(&stray(21_000_000)),
            Err(MemoryError::StrayCovered { .. })
        ));
    }

    #[test]
    fn ram_grows_with_samples_in_whole_large_pages() {
        let small = Config {
            probes: 0b111,
            iterations: 10,
            ..Default::default()
        };
        assert_eq!(ram_size_for(&small).unwrap(), RESULT_ADDR + RAM_GRANULE);
        let big = Config {
            probes: 0b111,
            iterations: 1_000_000,
            ..Default::default()
        };
        let size = ram_size_for(&big).unwrap();
        assert!(size >= RESULT_ADDR + 24_000_000 && size.is_multiple_of(RAM_GRANULE));
    }

    #[test]
    fn samples_beyond_the_mapped_gigabyte_are_refused() {
        let huge = Config {
            probes: 0b111,
            iterations: u32::MAX,
            ..Default::default()
        };
        assert!(matches!(ram_size_for(&huge), Err(MemoryError::TooLarge { .. })));
    }

    #[test]
    fn boot_structures_land_where_the_abi_says() {
        let config = Config {
            magic: guest_payload::CONFIG_MAGIC,
            iterations: 3,
            ..Default::default()
        };
        let memory = allocate(ram_size_for(&config).unwrap()).unwrap();
        write_boot_structures(&memory, &config).unwrap();
        let back = read(&memory, layout::CONFIG_ADDR, config.as_bytes().len()).unwrap();
        assert_eq!(back, config.as_bytes());
        let gdt_code = read(&memory, GDT_ADDR + 8, 8).unwrap();
        assert_eq!(u64::from_le_bytes(gdt_code.try_into().unwrap()), gdt::table()[1]);
    }
}
