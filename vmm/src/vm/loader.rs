//! The guest payload: an ELF64 for x86-64, validated here, loaded through linux-loader.
//!
//! linux-loader places each `PT_LOAD` segment at its `p_paddr` and copies its file bytes,
//! but checks neither the class nor the machine, nor that segments stay clear of the
//! VMM's own structures. Those checks are ours, done on the bytes before anything loads.
//! The symbol table is read too (reports name the sites by it), the executable segments
//! are decoded with a real x86 decoder (iced-x86) to find every CPUID instruction, and
//! the payload's `vmm_payload_info` says what it declares about itself.

use guest_payload::layout::{PAYLOAD_END, PAYLOAD_START};
use guest_payload::{PayloadInfo, PAYLOAD_INFO_SYMBOL};
use linux_loader::loader::{Elf, KernelLoader};
use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The payload built by `build.rs` from `guest-payload`.
pub static EMBEDDED_PAYLOAD: &[u8] = include_bytes!(env!("VMM_GUEST_PAYLOAD_ELF"));

/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
/// `p_flags` bit: the segment is executable.
const PF_X: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const SHDR_SIZE: usize = 64;
const SYM_SIZE: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot read the payload {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the payload is not an ELF file (it does not start with \\x7fELF)")]
    NotElf,
    #[error("the payload is a 32-bit ELF; vmm boots 64-bit (ELF64) payloads only")]
    NotElf64,
    #[error("the payload is a big-endian ELF; x86-64 is little-endian")]
    BigEndian,
    #[error("the payload's ELF header is invalid: {0}")]
    InvalidIdent(&'static str),
    #[error("the payload is built for {machine} (e_machine {code}), not x86-64")]
    WrongMachine { code: u16, machine: &'static str },
    #[error("the payload is an ELF of type {0}, not an executable (ET_EXEC): link it static and non-PIE")]
    NotExecutable(u16),
    #[error("the payload's ELF headers are truncated or inconsistent: {0}")]
    Malformed(&'static str),
    #[error("the payload has no loadable segment")]
    NoSegments,
    #[error("payload segment at guest address {addr:#x} ({size:#x} bytes) lies outside the payload window [{PAYLOAD_START:#x}, {PAYLOAD_END:#x}) of guest RAM")]
    SegmentOutOfRange { addr: u64, size: u64 },
    #[error("the payload's entry point {0:#x} is not inside any of its loadable segments")]
    EntryOutsideSegments(u64),
    #[error("the payload's entry point {0:#x} lies past its segment's bytes in the file (in zero-filled memory, such as .bss): there is no code there")]
    EntryNotInFile(u64),
    #[error("linux-loader could not load the payload: {0}")]
    Load(#[from] linux_loader::loader::Error),
}

/// Where a payload came from, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PayloadSource {
    Embedded,
    File(PathBuf),
    /// A few instructions the VMM made itself, to probe what this KVM can run.
    Generated(&'static str),
}

impl std::fmt::Display for PayloadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadSource::Embedded => write!(f, "embedded"),
            PayloadSource::File(path) => write!(f, "{}", path.display()),
            PayloadSource::Generated(what) => write!(f, "generated ({what})"),
        }
    }
}

/// A loadable segment: guest address, bytes in memory, where its bytes are in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub mem_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub executable: bool,
}

/// A validated payload, ready to load into any number of VMs.
#[derive(Clone, Debug)]
pub struct Payload {
    bytes: std::borrow::Cow<'static, [u8]>,
    pub source: PayloadSource,
    pub entry: u64,
    pub segments: Vec<Segment>,
    symbols: HashMap<String, u64>,
    /// Every CPUID instruction (`0f a2`) found by decoding the executable segments, in
    /// address order.
    pub cpuid_sites: Vec<u64>,
    /// Every RDTSC and RDTSCP, found the same way (for the evasions that trap them).
    pub tsc_sites: TscSites,
    /// What the payload declares (`vmm_payload_info`), if it declares anything.
    pub info: Option<PayloadInfo>,
}

impl Payload {
    /// The payload built into this binary.
    pub fn embedded() -> Result<Self, LoaderError> {
        Self::parse(std::borrow::Cow::Borrowed(EMBEDDED_PAYLOAD), PayloadSource::Embedded)
    }

    /// A payload from a file (`--payload FILE`).
    pub fn from_file(path: &Path) -> Result<Self, LoaderError> {
        let bytes =
            crate::input::read_capped(path, crate::input::MAX_PAYLOAD_BYTES).map_err(|source| LoaderError::Read {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(std::borrow::Cow::Owned(bytes), PayloadSource::File(path.to_owned()))
    }

    /// A payload from bytes already in memory (a file's, a fuzzer's), validated as
    /// `from_file` validates them.
    pub fn from_bytes(bytes: Vec<u8>, source: PayloadSource) -> Result<Self, LoaderError> {
        Self::parse(std::borrow::Cow::Owned(bytes), source)
    }

    /// A payload of `code` alone at [`PAYLOAD_START`], made by the VMM for a probe.
    pub fn generated(what: &'static str, code: &[u8]) -> Result<Self, LoaderError> {
        let image = elf_image(EM_X86_64, PAYLOAD_START, code);
        Self::parse(std::borrow::Cow::Owned(image), PayloadSource::Generated(what))
    }

    fn parse(bytes: std::borrow::Cow<'static, [u8]>, source: PayloadSource) -> Result<Self, LoaderError> {
        let b = &bytes[..];
        if b.len() < 4 || b[..4] != *b"\x7fELF" {
            return Err(LoaderError::NotElf);
        }
        if b.len() < EHDR_SIZE {
            return Err(LoaderError::Malformed("shorter than an ELF64 header"));
        }
        match b[4] {
            2 => {}
            1 => return Err(LoaderError::NotElf64),
            _ => {
                return Err(LoaderError::InvalidIdent(
                    "its class (EI_CLASS) is neither 32- nor 64-bit",
                ))
            }
        }
        match b[5] {
            1 => {}
            2 => return Err(LoaderError::BigEndian),
            _ => {
                return Err(LoaderError::InvalidIdent(
                    "its byte order (EI_DATA) is neither little- nor big-endian",
                ))
            }
        }
        let machine = u16_at(b, 18)?;
        if machine != EM_X86_64 {
            return Err(LoaderError::WrongMachine {
                code: machine,
                machine: machine_name(machine),
            });
        }
        let elf_type = u16_at(b, 16)?;
        if elf_type != ET_EXEC {
            return Err(LoaderError::NotExecutable(elf_type));
        }
        let entry = u64_at(b, 24)?;
        let segments = load_segments(b)?;
        if segments.is_empty() {
            return Err(LoaderError::NoSegments);
        }
        let Some(entry_segment) = segments.iter().find(|s| entry >= s.addr && entry - s.addr < s.mem_size) else {
            return Err(LoaderError::EntryOutsideSegments(entry));
        };
        if entry - entry_segment.addr >= entry_segment.file_size {
            return Err(LoaderError::EntryNotInFile(entry));
        }
        let symbols = symbols(b)?;
        let cpuid_sites = decode_cpuid_sites(b, &segments);
        let tsc_sites = decode_tsc_sites(b, &segments);
        let info = symbols
            .get(PAYLOAD_INFO_SYMBOL)
            .and_then(|&addr| file_bytes_at(b, &segments, addr, std::mem::size_of::<PayloadInfo>()))
            .and_then(PayloadInfo::from_bytes);
        Ok(Self {
            bytes,
            source,
            entry,
            segments,
            symbols,
            cpuid_sites,
            tsc_sites,
            info,
        })
    }

    /// Does it declare this capability (a bit of `guest_payload::capabilities`)?
    pub fn declares(&self, capability: u32) -> bool {
        self.info.is_some_and(|i| i.capabilities & capability != 0)
    }

    /// The name it declares, if it declares one.
    pub fn declared_name(&self) -> Option<String> {
        self.info
            .map(|i| String::from_utf8_lossy(i.name_text()).escape_debug().to_string())
    }

    /// A digest of its bytes (FNV-1a, 64 bits): enough to tell two payloads apart in
    /// reports that are merged, not a cryptographic hash.
    pub fn digest(&self) -> String {
        let hash = self.bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("fnv1a64:{hash:016x}")
    }

    /// Where it came from and the name it declares, for reports.
    pub fn describe(&self) -> String {
        match self.declared_name() {
            Some(name) => format!("{} (\"{name}\")", self.source),
            None => format!("{} (declares nothing)", self.source),
        }
    }

    /// The name of the symbol at `addr`, if the symbol table names one there.
    pub fn symbol_at(&self, addr: u64) -> Option<&str> {
        self.symbols
            .iter()
            .filter(|(_, &value)| value == addr)
            .map(|(name, _)| name.as_str())
            .min()
    }

    /// Where `addr` lies in the payload's code, as `symbol+0xoffset` from the nearest
    /// symbol at or below it within an executable segment; `None` outside the code or
    /// where the payload has no symbol table.
    pub fn place_of(&self, addr: u64) -> Option<String> {
        let segment = self
            .segments
            .iter()
            .find(|s| s.executable && addr >= s.addr && addr - s.addr < s.mem_size)?;
        let (name, value) = self
            .symbols
            .iter()
            .filter(|(_, &value)| value >= segment.addr && value <= addr)
            .max_by_key(|(name, &value)| (value, std::cmp::Reverse(name.as_str())))?;
        Some(match addr - value {
            0 => name.clone(),
            offset => format!("{name}+{offset:#x}"),
        })
    }

    /// The address of a global symbol, if the payload has a symbol table naming it.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).copied()
    }

    /// Copies the segments into guest memory.
    pub fn load_into(&self, memory: &GuestMemoryMmap) -> Result<(), LoaderError> {
        Elf::load(
            memory,
            None,
            &mut Cursor::new(&self.bytes[..]),
            Some(GuestAddress(PAYLOAD_START)),
        )?;
        Ok(())
    }
}

fn load_segments(b: &[u8]) -> Result<Vec<Segment>, LoaderError> {
    let phoff = u64_at(b, 32)? as usize;
    let phentsize = u16_at(b, 54)? as usize;
    let phnum = u16_at(b, 56)? as usize;
    if phnum > 0 && phentsize != PHDR_SIZE {
        return Err(LoaderError::Malformed("program header entries are not 56 bytes"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * PHDR_SIZE)
            .filter(|at| at.checked_add(PHDR_SIZE).is_some_and(|end| end <= b.len()))
            .ok_or(LoaderError::Malformed("a program header lies past the end of the file"))?;
        if u32_at(b, at)? != PT_LOAD {
            continue;
        }
        let (offset, paddr, file_size, mem_size) = (
            u64_at(b, at + 8)?,
            u64_at(b, at + 24)?,
            u64_at(b, at + 32)?,
            u64_at(b, at + 40)?,
        );
        if file_size > mem_size {
            return Err(LoaderError::Malformed(
                "a segment has more file bytes than memory bytes",
            ));
        }
        if offset.checked_add(file_size).is_none_or(|end| end > b.len() as u64) {
            return Err(LoaderError::Malformed(
                "a segment's bytes extend past the end of the file",
            ));
        }
        let end = paddr.checked_add(mem_size);
        if paddr < PAYLOAD_START || end.is_none_or(|end| end > PAYLOAD_END) {
            return Err(LoaderError::SegmentOutOfRange {
                addr: paddr,
                size: mem_size,
            });
        }
        let flags = u32_at(b, at + 4)?;
        segments.push(Segment {
            addr: paddr,
            mem_size,
            file_offset: offset,
            file_size,
            executable: flags & PF_X != 0,
        });
    }
    Ok(segments)
}

/// Every CPUID in the executable segments, by a linear sweep with a real decoder (data
/// mixed into code could hide or fake a site; compilers do not put data in `.text`).
fn decode_cpuid_sites(b: &[u8], segments: &[Segment]) -> Vec<u64> {
    let mut sites = Vec::new();
    for segment in segments.iter().filter(|s| s.executable) {
        let Some(code) = slice(b, segment.file_offset as usize, segment.file_size as usize).ok() else {
            continue;
        };
        sites.extend(crate::arch::x86_64::decode::cpuid_sites(code, segment.addr));
    }
    sites.sort_unstable();
    sites
}

/// Where a payload reads the TSC, in address order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TscSites {
    pub rdtsc: Vec<u64>,
    pub rdtscp: Vec<u64>,
}

/// Every RDTSC and RDTSCP in the executable segments, swept as CPUIDs are.
fn decode_tsc_sites(b: &[u8], segments: &[Segment]) -> TscSites {
    let mut sites = TscSites::default();
    for segment in segments.iter().filter(|s| s.executable) {
        let Some(code) = slice(b, segment.file_offset as usize, segment.file_size as usize).ok() else {
            continue;
        };
        let (rdtsc, rdtscp) = crate::arch::x86_64::decode::tsc_sites(code, segment.addr);
        sites.rdtsc.extend(rdtsc);
        sites.rdtscp.extend(rdtscp);
    }
    sites.rdtsc.sort_unstable();
    sites.rdtscp.sort_unstable();
    sites
}

/// `len` file bytes at guest address `addr`, if a segment holds them in the file.
fn file_bytes_at<'b>(b: &'b [u8], segments: &[Segment], addr: u64, len: usize) -> Option<&'b [u8]> {
    let end = addr.checked_add(len as u64)?;
    let segment = segments
        .iter()
        .find(|s| addr >= s.addr && s.addr.checked_add(s.file_size).is_some_and(|s_end| end <= s_end))?;
    let offset = segment.file_offset.checked_add(addr - segment.addr)?;
    slice(b, usize::try_from(offset).ok()?, len).ok()
}

/// Global and local symbols from `.symtab`; a payload without one simply has none.
fn symbols(b: &[u8]) -> Result<HashMap<String, u64>, LoaderError> {
    let shoff = u64_at(b, 40)? as usize;
    let shentsize = u16_at(b, 58)? as usize;
    let shnum = u16_at(b, 60)? as usize;
    let mut symbols = HashMap::new();
    if shoff == 0 || shnum == 0 {
        return Ok(symbols);
    }
    if shentsize != SHDR_SIZE {
        return Err(LoaderError::Malformed("section header entries are not 64 bytes"));
    }
    let section = |i: usize| -> Result<(u32, u32, usize, usize), LoaderError> {
        let at = shoff
            .checked_add(i * SHDR_SIZE)
            .filter(|at| at.checked_add(SHDR_SIZE).is_some_and(|end| end <= b.len()))
            .ok_or(LoaderError::Malformed("a section header lies past the end of the file"))?;
        Ok((
            u32_at(b, at + 4)?,
            u32_at(b, at + 40)?,
            u64_at(b, at + 24)? as usize,
            u64_at(b, at + 32)? as usize,
        ))
    };
    // An ELF has at most one symbol table; a crafted file with thousands of sections all
    // naming one big table would otherwise cost minutes before any VM starts.
    for i in 0..shnum {
        let (kind, link, offset, size) = section(i)?;
        if kind != SHT_SYMTAB {
            continue;
        }
        if !symbols.is_empty() {
            break;
        }
        let (_, _, str_offset, str_size) = section(link as usize)?;
        let strings = slice(b, str_offset, str_size)?;
        let table = slice(b, offset, size)?;
        for sym in table.chunks_exact(SYM_SIZE) {
            let name_at = u32_at(sym, 0)? as usize;
            let value = u64_at(sym, 8)?;
            let Some(name) = strings.get(name_at..).and_then(|s| s.split(|&c| c == 0).next()) else {
                continue;
            };
            if let Ok(name) = std::str::from_utf8(name) {
                if !name.is_empty() {
                    symbols.insert(name.to_owned(), value);
                }
            }
        }
    }
    Ok(symbols)
}

fn slice(b: &[u8], offset: usize, size: usize) -> Result<&[u8], LoaderError> {
    offset
        .checked_add(size)
        .and_then(|end| b.get(offset..end))
        .ok_or(LoaderError::Malformed("a section extends past the end of the file"))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, LoaderError> {
    Ok(u16::from_le_bytes(array(b, at)?))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, LoaderError> {
    Ok(u32::from_le_bytes(array(b, at)?))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, LoaderError> {
    Ok(u64::from_le_bytes(array(b, at)?))
}
fn array<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], LoaderError> {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(LoaderError::Malformed("a header field lies past the end of the file"))
}

fn machine_name(code: u16) -> &'static str {
    match code {
        3 => "x86 (32-bit)",
        40 => "ARM (32-bit)",
        183 => "AArch64",
        243 => "RISC-V",
        8 => "MIPS",
        20 | 21 => "PowerPC",
        22 => "S/390",
        _ => "another architecture",
    }
}

/// A minimal ELF64 executable: header, one executable PT_LOAD at `paddr` holding `code`.
fn elf_image(machine: u16, paddr: u64, code: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    b[18..20].copy_from_slice(&machine.to_le_bytes());
    b[24..32].copy_from_slice(&paddr.to_le_bytes());
    b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    b[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = EHDR_SIZE;
    b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    b[ph + 4..ph + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
    let offset = (EHDR_SIZE + PHDR_SIZE) as u64;
    for (field, value) in [
        (8, offset),
        (16, paddr),
        (24, paddr),
        (32, code.len() as u64),
        (40, code.len() as u64),
    ] {
        b[ph + field..ph + field + 8].copy_from_slice(&value.to_le_bytes());
    }
    b.extend_from_slice(code);
    b
}

/// Hand-made ELF files for tests (here and in `tests/`), so bad payloads can be built
/// without a cross toolchain.
#[doc(hidden)]
pub mod test_support {
    /// A minimal ELF64 executable: header, one PT_LOAD at `paddr` with `code`.
    pub fn tiny_elf(machine: u16, paddr: u64, code: &[u8]) -> Vec<u8> {
        super::elf_image(machine, paddr, code)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::tiny_elf;
    use super::*;

    fn parse(bytes: Vec<u8>) -> Result<Payload, LoaderError> {
        Payload::parse(std::borrow::Cow::Owned(bytes), PayloadSource::Embedded)
    }

    #[test]
    fn a_place_in_the_code_is_named_by_the_nearest_symbol_below_it() {
        let payload = Payload::embedded().unwrap();
        let (name, addr) = guest_payload::timing::CPUID_SITE_SYMBOLS
            .iter()
            .find_map(|name| payload.symbol(name).map(|a| (*name, a)))
            .unwrap();
        assert_eq!(payload.place_of(addr).as_deref(), Some(name));
        let next = payload.place_of(addr + 1).unwrap();
        assert!(next.ends_with("+0x1"), "{next}");
        assert_eq!(payload.place_of(0x10), None, "outside the code");
    }

    #[test]
    fn embedded_payload_is_valid_and_its_decoded_sites_are_its_named_ones() {
        let payload = Payload::embedded().unwrap();
        assert_eq!(payload.entry, PAYLOAD_START);
        let mut named: Vec<u64> = guest_payload::timing::CPUID_SITE_SYMBOLS
            .iter()
            .chain([&guest_payload::timing::CPUID_MSR_SITE_SYMBOL])
            .map(|name| payload.symbol(name).unwrap_or_else(|| panic!("{name} missing")))
            .collect();
        named.sort_unstable();
        assert_eq!(
            payload.cpuid_sites, named,
            "the decoder finds exactly the labelled CPUIDs"
        );
        let info = payload.info.expect("the embedded payload declares itself");
        assert_eq!(info.abi_version, guest_payload::ABI_VERSION);
        assert_eq!(info.name_text(), b"vmm timing core");
        assert_eq!(
            payload.symbol_at(named[0]).map(|s| s.starts_with("vmm_site_cpuid")),
            Some(true)
        );
    }

    #[test]
    fn cpuid_sites_are_decoded_not_pattern_matched() {
        // nop; cpuid; mov eax, 0x00a20f00 (holds the bytes 0f a2 inside an immediate);
        // cpuid; ret
        let code = [0x90, 0x0f, 0xa2, 0xb8, 0x00, 0x0f, 0xa2, 0x00, 0x0f, 0xa2, 0xc3];
        let payload = parse(tiny_elf(EM_X86_64, PAYLOAD_START, &code)).unwrap();
        assert_eq!(payload.cpuid_sites, vec![PAYLOAD_START + 1, PAYLOAD_START + 8]);
        assert!(payload.info.is_none(), "no symbol table, no declaration");
    }

    #[test]
    fn tsc_reads_are_decoded_too_and_the_embedded_core_has_some() {
        // rdtsc; mov eax, 0x0031_0f00 (0f 31 in an immediate); rdtscp; ret
        let code = [0x0f, 0x31, 0xb8, 0x00, 0x0f, 0x31, 0x00, 0x0f, 0x01, 0xf9, 0xc3];
        let payload = parse(tiny_elf(EM_X86_64, PAYLOAD_START, &code)).unwrap();
        assert_eq!(payload.tsc_sites.rdtsc, vec![PAYLOAD_START]);
        assert_eq!(payload.tsc_sites.rdtscp, vec![PAYLOAD_START + 7]);
        let embedded = Payload::embedded().unwrap();
        assert!(embedded.tsc_sites.rdtsc.len() >= 4, "{:?}", embedded.tsc_sites);
        // One: the clock readings' (read only where the VMM says the KVM runs it).
        assert_eq!(embedded.tsc_sites.rdtscp.len(), 1, "{:?}", embedded.tsc_sites);
    }

    #[test]
    fn thousands_of_symbol_table_sections_cost_one_table() {
        // A file whose 60,000 section headers all name the same 100,000-symbol table.
        let mut b = tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4]);
        let table_at = b.len();
        b.extend(std::iter::repeat_n(0u8, SYM_SIZE * 100_000));
        let strings_at = b.len();
        b.extend_from_slice(b"\0x\0");
        let shoff = b.len();
        let sections = 60_000usize;
        for _ in 0..sections {
            let mut sh = [0u8; SHDR_SIZE];
            sh[4..8].copy_from_slice(&SHT_SYMTAB.to_le_bytes());
            sh[24..32].copy_from_slice(&(table_at as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&((SYM_SIZE * 100_000) as u64).to_le_bytes());
            sh[40..44].copy_from_slice(&0u32.to_le_bytes()); // link: section 0 is the strings
            b.extend_from_slice(&sh);
        }
        // Section 0 doubles as the string table here: point it at the strings.
        b[shoff + 24..shoff + 32].copy_from_slice(&(strings_at as u64).to_le_bytes());
        b[shoff + 32..shoff + 40].copy_from_slice(&3u64.to_le_bytes());
        b[shoff + 4..shoff + 8].copy_from_slice(&0u32.to_le_bytes());
        // Every symbol names "x" (offset 1).
        for sym in b[table_at..strings_at].chunks_exact_mut(SYM_SIZE) {
            sym[0..4].copy_from_slice(&1u32.to_le_bytes());
        }
        b[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[58..60].copy_from_slice(&(SHDR_SIZE as u16).to_le_bytes());
        b[60..62].copy_from_slice(&(sections as u16).to_le_bytes());
        let started = std::time::Instant::now();
        let payload = parse(b).unwrap();
        assert_eq!(payload.symbol("x"), Some(0));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_minimal_x86_64_executable_is_accepted() {
        let payload = parse(tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4])).unwrap();
        assert_eq!(
            payload.segments,
            vec![Segment {
                addr: PAYLOAD_START,
                mem_size: 1,
                file_offset: (EHDR_SIZE + PHDR_SIZE) as u64,
                file_size: 1,
                executable: true,
            }]
        );
    }

    #[test]
    fn bad_payloads_are_refused_with_the_reason() {
        assert!(matches!(
            parse(b"#!/bin/sh\necho hi\n".to_vec()),
            Err(LoaderError::NotElf)
        ));
        assert!(matches!(parse(vec![]), Err(LoaderError::NotElf)));
        assert!(matches!(parse(b"\x7fELF".to_vec()), Err(LoaderError::Malformed(_))));
        let mut elf32 = tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4]);
        elf32[4] = 1;
        assert!(matches!(parse(elf32), Err(LoaderError::NotElf64)));
        // A class or byte order of 0 (or anything unknown) is invalid, not "32-bit".
        for (field, value) in [(4, 0), (4, 7), (5, 0), (5, 9)] {
            let mut bad = tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4]);
            bad[field] = value;
            let error = parse(bad).unwrap_err();
            assert!(
                matches!(error, LoaderError::InvalidIdent(_)),
                "byte {field} = {value}: {error}"
            );
        }
        let mut big = tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4]);
        big[5] = 2;
        assert!(matches!(parse(big), Err(LoaderError::BigEndian)));
        // An entry in the segment's zero-filled tail (memory beyond its file bytes).
        let mut bss_entry = tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4]);
        let ph = EHDR_SIZE;
        bss_entry[ph + 40..ph + 48].copy_from_slice(&0x100u64.to_le_bytes());
        bss_entry[24..32].copy_from_slice(&(PAYLOAD_START + 0x10).to_le_bytes());
        assert!(matches!(parse(bss_entry), Err(LoaderError::EntryNotInFile(_))));
        assert!(matches!(
            parse(tiny_elf(183, PAYLOAD_START, &[0])),
            Err(LoaderError::WrongMachine { code: 183, .. })
        ));
        assert!(matches!(
            parse(tiny_elf(EM_X86_64, 0x1000, &[0xf4])),
            Err(LoaderError::SegmentOutOfRange { addr: 0x1000, .. })
        ));
        assert!(matches!(
            parse(tiny_elf(EM_X86_64, PAYLOAD_END - 1, &[0, 0])),
            Err(LoaderError::SegmentOutOfRange { .. })
        ));
        let truncated = tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4; 64]);
        assert!(matches!(
            parse(truncated[..truncated.len() - 10].to_vec()),
            Err(LoaderError::Malformed(_))
        ));
    }

    /// The payload is built without SSE because an emulating KVM cannot run most of it
    /// (see build.rs). rustc is phasing out that switch; this catches the day it stops working.
    #[test]
    fn embedded_payload_holds_no_sse_instruction() {
        let path = std::env::temp_dir().join(format!("vmm-payload-{}.elf", std::process::id()));
        std::fs::write(&path, EMBEDDED_PAYLOAD).unwrap();
        let disassembly = std::process::Command::new("objdump").arg("-d").arg(&path).output();
        std::fs::remove_file(&path).ok();
        let disassembly = disassembly.expect("objdump (binutils, installed with gcc) disassembles the payload");
        let text = String::from_utf8_lossy(&disassembly.stdout);
        assert!(text.contains("vmm_site_cpuid_probe"), "objdump printed no disassembly");
        let sse: Vec<&str> = text.lines().filter(|l| l.contains("%xmm")).collect();
        assert!(sse.is_empty(), "SSE in the payload: {sse:?}");
        // Nor x87: an f64 in an ABI struct once made the compiler copy it with fldl/fstpl,
        // which the emulating KVM cannot run either.
        let x87: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\tfld") || l.contains("\tfst"))
            .collect();
        assert!(x87.is_empty(), "x87 in the payload: {x87:?}");
    }

    #[test]
    fn every_truncation_of_the_embedded_payload_is_refused_without_panicking() {
        assert!(parse(EMBEDDED_PAYLOAD.to_vec()).is_ok(), "the whole payload parses");
        // The section headers sit at the end of the file: every cut loses some of them.
        for len in (0..EMBEDDED_PAYLOAD.len()).step_by(97) {
            assert!(
                parse(EMBEDDED_PAYLOAD[..len].to_vec()).is_err(),
                "a payload cut to {len} of {} bytes was accepted",
                EMBEDDED_PAYLOAD.len()
            );
        }
    }
}
