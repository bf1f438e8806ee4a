//! The timing core: each sample is `lfence; rdtsc; <probe>; lfence; rdtsc`.
//!
//! The sampling routines are written in assembly (`global_asm!`), not inline asm, for two
//! reasons. First, every instruction between the two timestamps is ours, identical in the
//! guest and in the native runner. Second, each probe instruction sits at a global symbol
//! (`vmm_site_*`) that exists exactly once in the binary, so the VMM can find the CPUID
//! sites in the guest ELF to trap them (hardware breakpoints, `int3` patches).
//!
//! `rdtscp` is not used: some KVMs cannot emulate it in the guest (an emulating KVM fails
//! on it; see `docs/README.md`); the `lfence` before each `rdtsc` orders it after
//! everything earlier.
//!
//! A sample is `end - start` as a signed [`Cycles`]: where a hypervisor moved the guest's
//! TSC back during the probe, the sample is negative, and says so.

use crate::abi::{ports, CpuidRecord, Cycles, Probe};
use core::arch::global_asm;

/// The global symbols of every instruction that executes CPUID, in the order the guest
/// reports their bytes. Keep in sync with the labels in the assembly below. (The VMM
/// finds CPUID sites by decoding the code; the symbols name them in reports.)
pub const CPUID_SITE_SYMBOLS: [&str; 3] = [
    "vmm_site_cpuid_probe",
    "vmm_site_cpuid_unfenced",
    "vmm_site_cpuid_query",
];
/// The CPUID of the guest's snapshot (not a timed sample), counted apart.
pub const CPUID_QUERY_SITE_SYMBOL: &str = "vmm_site_cpuid_query";
/// The hypercall (`out`) that answers snapshot queries in paravirt mode, told apart from
/// the timed one so the reports can count them separately.
pub const HYPERCALL_QUERY_SITE_SYMBOL: &str = "vmm_site_hypercall_query";
/// The encoding of CPUID, what a CPUID site holds when nobody patched it.
pub const CPUID_OPCODE: [u8; 2] = [0x0f, 0xa2];

/// Where each CPUID and hypercall probe keeps its first timestamp while the probed
/// instruction runs: at a trap or hypercall exit, this register of the guest holds the
/// TSC the guest read first (`vmm trace` shows it).
pub const FIRST_TIMESTAMP_REGISTER: &str = "r8";

global_asm!(
    r#"
    .pushsection .text.vmm_timing,"ax",@progbits

    # rax = TSC, ordered after everything before it (clobbers rdx)
    .macro TSC_TO_RAX
        lfence
        rdtsc
        shl rdx, 32
        or rax, rdx
    .endm

    # i64 vmm_sample_cpuid(u32 leaf /* edi */, u32 subleaf /* esi */)
    .globl vmm_sample_cpuid
    vmm_sample_cpuid:
        push rbx
        TSC_TO_RAX
        mov r8, rax
        mov eax, edi
        mov ecx, esi
    .globl vmm_site_cpuid_probe
    vmm_site_cpuid_probe:
        cpuid
        TSC_TO_RAX
        sub rax, r8
        pop rbx
        ret

    # rax = TSC, unordered: what detectors that use a bare rdtsc read (clobbers rdx)
    .macro BARE_TSC_TO_RAX
        rdtsc
        shl rdx, 32
        or rax, rdx
    .endm

    # i64 vmm_sample_cpuid_unfenced(u32 leaf /* edi */, u32 subleaf /* esi */):
    # rdtsc; cpuid; rdtsc with no fence, as pafish and al-khaser time it
    .globl vmm_sample_cpuid_unfenced
    vmm_sample_cpuid_unfenced:
        push rbx
        BARE_TSC_TO_RAX
        mov r8, rax
        mov eax, edi
        mov ecx, esi
    .globl vmm_site_cpuid_unfenced
    vmm_site_cpuid_unfenced:
        cpuid
        BARE_TSC_TO_RAX
        sub rax, r8
        pop rbx
        ret

    # i64 vmm_sample_hypercall_unfenced(u32 leaf /* edi */, u32 subleaf /* esi */)
    .globl vmm_sample_hypercall_unfenced
    vmm_sample_hypercall_unfenced:
        push rbx
        BARE_TSC_TO_RAX
        mov r8, rax
        mov eax, edi
        mov ecx, esi
        mov dx, {hypercall_port}
        out dx, eax
        BARE_TSC_TO_RAX
        sub rax, r8
        pop rbx
        ret

    # i64 vmm_sample_hypercall(u32 leaf /* edi */, u32 subleaf /* esi */)
    .globl vmm_sample_hypercall
    vmm_sample_hypercall:
        push rbx
        TSC_TO_RAX
        mov r8, rax
        mov eax, edi
        mov ecx, esi
        mov dx, {hypercall_port}
    .globl vmm_site_hypercall_probe
    vmm_site_hypercall_probe:
        out dx, eax
        TSC_TO_RAX
        sub rax, r8
        pop rbx
        ret

    # i64 vmm_sample_nop(void)
    .globl vmm_sample_nop
    vmm_sample_nop:
        TSC_TO_RAX
        mov r8, rax
    .globl vmm_site_nop_probe
    vmm_site_nop_probe:
        nop
        TSC_TO_RAX
        sub rax, r8
        ret

    # i64 vmm_sample_lfence8(void): eight serialising fences
    .globl vmm_sample_lfence8
    vmm_sample_lfence8:
        TSC_TO_RAX
        mov r8, rax
        .rept 8
        lfence
        .endr
        TSC_TO_RAX
        sub rax, r8
        ret

    # i64 vmm_sample_rdtsc(void): nothing between the timestamps
    .globl vmm_sample_rdtsc
    vmm_sample_rdtsc:
        TSC_TO_RAX
        mov r8, rax
        TSC_TO_RAX
        sub rax, r8
        ret

    # void vmm_cpuid_query(u32 leaf /* edi */, u32 subleaf /* esi */, u32 out[4] /* rdx */)
    .globl vmm_cpuid_query
    vmm_cpuid_query:
        push rbx
        mov r8, rdx
        mov eax, edi
        mov ecx, esi
    .globl vmm_site_cpuid_query
    vmm_site_cpuid_query:
        cpuid
        mov [r8], eax
        mov [r8 + 4], ebx
        mov [r8 + 8], ecx
        mov [r8 + 12], edx
        pop rbx
        ret

    # void vmm_hypercall_query(u32 leaf /* edi */, u32 subleaf /* esi */, u32 out[4] /* rdx */)
    .globl vmm_hypercall_query
    vmm_hypercall_query:
        push rbx
        mov r8, rdx
        mov eax, edi
        mov ecx, esi
        mov dx, {hypercall_port}
    .globl vmm_site_hypercall_query
    vmm_site_hypercall_query:
        out dx, eax
        mov [r8], eax
        mov [r8 + 4], ebx
        mov [r8 + 8], ecx
        mov [r8 + 12], edx
        pop rbx
        ret

    # u64 vmm_read_tsc(void)
    .globl vmm_read_tsc
    vmm_read_tsc:
        TSC_TO_RAX
        ret

    .purgem TSC_TO_RAX
    .purgem BARE_TSC_TO_RAX
    .popsection
    "#,
    hypercall_port = const ports::HYPERCALL,
);

extern "C" {
    fn vmm_sample_cpuid(leaf: u32, subleaf: u32) -> Cycles;
    fn vmm_sample_hypercall(leaf: u32, subleaf: u32) -> Cycles;
    fn vmm_sample_nop() -> Cycles;
    fn vmm_sample_rdtsc() -> Cycles;
    fn vmm_sample_lfence8() -> Cycles;
    fn vmm_sample_cpuid_unfenced(leaf: u32, subleaf: u32) -> Cycles;
    fn vmm_sample_hypercall_unfenced(leaf: u32, subleaf: u32) -> Cycles;
    static vmm_site_cpuid_probe: u8;
    static vmm_site_cpuid_unfenced: u8;
    static vmm_site_cpuid_query: u8;
    fn vmm_cpuid_query(leaf: u32, subleaf: u32, out: *mut [u32; 4]);
    fn vmm_hypercall_query(leaf: u32, subleaf: u32, out: *mut [u32; 4]);
    fn vmm_read_tsc() -> u64;
}

/// How CPUID reaches whoever answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidPath {
    /// Execute the CPUID instruction (native, hardware-assisted, trap-and-emulate).
    Instruction,
    /// Ask the VMM with port I/O on [`ports::HYPERCALL`] (paravirt). Only meaningful
    /// inside a `vmm` guest: in a host process the `out` faults (SIGSEGV).
    Hypercall,
}

/// What one probe run needs besides its output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cpuid_leaf: u32,
    pub cpuid_subleaf: u32,
    /// Samples taken and dropped first (caches, branch predictors, lazy host paging).
    pub warmup: u32,
    pub cpuid_path: CpuidPath,
}

/// Times `probe` `out.len()` times after `request.warmup` dropped samples; each sample is
/// in TSC cycles, negative where the TSC ran backwards.
pub fn measure(probe: Probe, request: &Request, out: &mut [Cycles]) {
    let sample = || -> Cycles {
        let (leaf, subleaf) = (request.cpuid_leaf, request.cpuid_subleaf);
        // SAFETY: the routines above only touch registers (rbx is saved and restored) and
        // follow the System V calling convention.
        unsafe {
            match (probe, request.cpuid_path) {
                (Probe::Cpuid, CpuidPath::Instruction) => vmm_sample_cpuid(leaf, subleaf),
                (Probe::Cpuid, CpuidPath::Hypercall) => vmm_sample_hypercall(leaf, subleaf),
                (Probe::Nop, _) => vmm_sample_nop(),
                (Probe::Rdtsc, _) => vmm_sample_rdtsc(),
                (Probe::Lfence8, _) => vmm_sample_lfence8(),
                (Probe::CpuidUnfenced, CpuidPath::Instruction) => vmm_sample_cpuid_unfenced(leaf, subleaf),
                (Probe::CpuidUnfenced, CpuidPath::Hypercall) => vmm_sample_hypercall_unfenced(leaf, subleaf),
            }
        }
    };
    for _ in 0..probe.warmup(request.warmup) {
        core::hint::black_box(sample());
    }
    for slot in out.iter_mut() {
        *slot = sample();
    }
}

/// Asks for one CPUID leaf along `path` and returns what came back.
pub fn query_cpuid(path: CpuidPath, leaf: u32, subleaf: u32) -> CpuidRecord {
    let mut regs = [0u32; 4];
    // SAFETY: the routines write exactly four u32s to a valid, exclusive pointer.
    unsafe {
        match path {
            CpuidPath::Instruction => vmm_cpuid_query(leaf, subleaf, &mut regs),
            CpuidPath::Hypercall => vmm_hypercall_query(leaf, subleaf, &mut regs),
        }
    }
    CpuidRecord {
        leaf,
        subleaf,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
    }
}

/// The first two bytes of each CPUID site in this binary's own code, in
/// [`CPUID_SITE_SYMBOLS`] order: what a guest checking its code integrity sees.
pub fn cpuid_site_bytes() -> [[u8; 2]; 3] {
    // SAFETY: the symbols label instructions in our own text section, readable and at
    // least two bytes long (`cpuid` is `0f a2`); volatile, since a hypervisor may have
    // patched them behind the compiler's back.
    unsafe {
        [
            &raw const vmm_site_cpuid_probe,
            &raw const vmm_site_cpuid_unfenced,
            &raw const vmm_site_cpuid_query,
        ]
        .map(|site| [core::ptr::read_volatile(site), core::ptr::read_volatile(site.add(1))])
    }
}

/// The time-stamp counter, ordered after earlier instructions.
pub fn read_tsc() -> u64 {
    // SAFETY: reads the TSC into rax/rdx; touches nothing else.
    unsafe { vmm_read_tsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE: Request = Request {
        cpuid_leaf: 0,
        cpuid_subleaf: 0,
        warmup: 5,
        cpuid_path: CpuidPath::Instruction,
    };

    #[test]
    fn every_native_probe_fills_its_buffer_with_positive_cycle_counts() {
        for probe in Probe::ALL {
            let mut samples = [0 as Cycles; 64];
            measure(probe, &NATIVE, &mut samples);
            assert!(samples.iter().all(|&s| s > 0 && s < 1 << 40), "{probe:?}: {samples:?}");
        }
    }

    #[test]
    fn cpuid_query_returns_the_vendor_of_this_cpu() {
        let leaf0 = query_cpuid(CpuidPath::Instruction, 0, 0);
        let expected = core::arch::x86_64::__cpuid_count(0, 0);
        assert_eq!(
            (leaf0.eax, leaf0.ebx, leaf0.ecx, leaf0.edx),
            (expected.eax, expected.ebx, expected.ecx, expected.edx)
        );
    }

    #[test]
    fn unpatched_sites_hold_cpuid() {
        assert_eq!(cpuid_site_bytes(), [CPUID_OPCODE; 3]);
    }

    #[test]
    fn tsc_moves_forward() {
        let first = read_tsc();
        let second = read_tsc();
        assert!(second > first);
    }
}
