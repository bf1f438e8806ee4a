//! The timing core: each sample is `lfence; rdtsc; <probe>; lfence; rdtsc`.
//!
//! The sampling routines are written in assembly (`global_asm!`), not inline asm, for two
//! reasons. First, every instruction between the two timestamps is ours, identical in the
//! guest and in the native runner. Second, each probe instruction sits at a global symbol
//! (`vmm_site_*`) that exists exactly once in the binary, so the VMM can find the CPUID
//! sites in the guest ELF to trap them (hardware breakpoints, `int3` patches).
//!
//! `rdtscp` is not used in a sample: some KVMs cannot emulate it in the guest (an
//! emulating KVM fails on it; see `docs/README.md`); the `lfence` before each `rdtsc`
//! orders it after everything earlier. It is read among the clocks
//! ([`read_vm_clocks`]) only where the VMM found that this KVM runs it.
//!
//! A sample is `end - start` as a signed [`Cycles`]: where a hypervisor moved the guest's
//! TSC back during the probe, the sample is negative, and says so.

use crate::abi::{clocks, counter, layout, ports, ClockReadings, CounterBlock, CpuidRecord, Cycles, Probe};
use core::arch::global_asm;
use core::sync::atomic::Ordering;

/// The global symbols of every instruction that executes CPUID, in the order the guest
/// reports their bytes. Keep in sync with the labels in the assembly below. (The VMM
/// finds CPUID sites by decoding the code; the symbols name them in reports.)
pub const CPUID_SITE_SYMBOLS: [&str; 4] = [
    "vmm_site_cpuid_probe",
    "vmm_site_cpuid_unfenced",
    "vmm_site_cpuid_query",
    "vmm_site_cpuid_timer",
];
/// The CPUID of the `msr-cpuid` window: a fifth site, in the binary only where that probe
/// runs (`--trap hw-breakpoint` has four debug registers for the other four).
pub const CPUID_MSR_SITE_SYMBOL: &str = "vmm_site_cpuid_msr";
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

    # i64 vmm_sample_msr_cpuid(u32 leaf, u32 subleaf): vmcheck's TimestampTiming window,
    # IA32_TSC read by rdmsr around CPUID, no fence (rdmsr of it serialises nothing)
    .globl vmm_sample_msr_cpuid
    vmm_sample_msr_cpuid:
        push rbx
        mov ecx, {msr_tsc}
        rdmsr
        shl rdx, 32
        or rax, rdx
        mov r8, rax
        mov eax, edi
        mov ecx, esi
    .globl vmm_site_cpuid_msr
    vmm_site_cpuid_msr:
        cpuid
        mov ecx, {msr_tsc}
        rdmsr
        shl rdx, 32
        or rax, rdx
        sub rax, r8
        pop rbx
        ret

    # i64 vmm_sample_msr_hypercall(u32 leaf, u32 subleaf): the same around the hypercall
    .globl vmm_sample_msr_hypercall
    vmm_sample_msr_hypercall:
        push rbx
        mov ecx, {msr_tsc}
        rdmsr
        shl rdx, 32
        or rax, rdx
        mov r8, rax
        mov eax, edi
        mov ecx, esi
        mov dx, {hypercall_port}
        out dx, eax
        mov ecx, {msr_tsc}
        rdmsr
        shl rdx, 32
        or rax, rdx
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

    # VMAware v2.7.0 TIMER's windows. void vmm_timer_cpuid(const u64 *counter /* rdi */,
    # i64 out[2] /* rsi */): out[0] = TSC cycles, out[1] = counter ticks over
    # `counter; cpuid(0, 0); counter`, the TSC read just outside the counter reads.
    .globl vmm_timer_cpuid
    vmm_timer_cpuid:
        push rbx
        mov r9, rsi
        TSC_TO_RAX
        mov r8, rax
        mov r10, [rdi]
        xor eax, eax
        xor ecx, ecx
    .globl vmm_site_cpuid_timer
    vmm_site_cpuid_timer:
        cpuid
        mov r11, [rdi]
        TSC_TO_RAX
        sub rax, r8
        mov [r9], rax
        sub r11, r10
        mov [r9 + 8], r11
        pop rbx
        ret

    # The same window with the CPUID asked for by hypercall (paravirt).
    .globl vmm_timer_hypercall
    vmm_timer_hypercall:
        push rbx
        mov r9, rsi
        TSC_TO_RAX
        mov r8, rax
        mov r10, [rdi]
        xor eax, eax
        xor ecx, ecx
        mov dx, {hypercall_port}
        out dx, eax
        mov r11, [rdi]
        TSC_TO_RAX
        sub rax, r8
        mov [r9], rax
        sub r11, r10
        mov [r9 + 8], r11
        pop rbx
        ret

    # void vmm_timer_lfence8(const u64 *counter /* rdi */, i64 out[2] /* rsi */):
    # `counter; 8 x lfence; counter`.
    .globl vmm_timer_lfence8
    vmm_timer_lfence8:
        TSC_TO_RAX
        mov r8, rax
        mov r10, [rdi]
        .rept 8
        lfence
        .endr
        mov r11, [rdi]
        TSC_TO_RAX
        sub rax, r8
        mov [rsi], rax
        sub r11, r10
        mov [rsi + 8], r11
        ret

    # i64 vmm_sample_xor_loop(void): XOR_ITERATIONS of `x ^= i; x = (x << 1) ^ (x >> 3)`
    # on a volatile x in memory (each read of x a load, each write a store).
    .globl vmm_sample_xor_loop
    vmm_sample_xor_loop:
        sub rsp, 8
        mov rcx, 0xdeadbeefcafebabe
        mov [rsp], rcx
        TSC_TO_RAX
        mov r8, rax
        xor esi, esi
    2:
        mov rax, [rsp]
        xor rax, rsi
        mov [rsp], rax
        mov rax, [rsp]
        mov rcx, [rsp]
        shl rax, 1
        shr rcx, 3
        xor rax, rcx
        mov [rsp], rax
        inc rsi
        cmp rsi, {xor_iterations}
        jb 2b
        TSC_TO_RAX
        sub rax, r8
        add rsp, 8
        ret

    # void vmm_counter_loop(CounterBlock *block /* rdi */): abi::counter::LOOP_CODE
    .globl vmm_counter_loop
    vmm_counter_loop:
    3:
        inc qword ptr [rdi]
        mov rax, [rdi + 0x40]
        test rax, rax
        je 3b
        cmp rax, 2
        je 4f
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov [rdi + 0x80], rax
        mov qword ptr [rdi + 0x40], 0
        jmp 3b
    4:
        ret
    .globl vmm_counter_loop_end
    vmm_counter_loop_end:

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
    msr_tsc = const clocks::MSR_IA32_TSC,
    xor_iterations = const counter::XOR_ITERATIONS,
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
    fn vmm_timer_cpuid(counter: *const u64, out: *mut [Cycles; 2]);
    fn vmm_timer_hypercall(counter: *const u64, out: *mut [Cycles; 2]);
    fn vmm_timer_lfence8(counter: *const u64, out: *mut [Cycles; 2]);
    fn vmm_sample_xor_loop() -> Cycles;
    fn vmm_sample_msr_cpuid(leaf: u32, subleaf: u32) -> Cycles;
    fn vmm_sample_msr_hypercall(leaf: u32, subleaf: u32) -> Cycles;
    fn vmm_counter_loop(block: *mut CounterBlock);
    static vmm_site_cpuid_timer: u8;
    static vmm_counter_loop_end: u8;
}

/// How the guest asks for CPUID: the instruction, or a hypercall (not a "path" of
/// `vmm`'s, which also says who answers the instruction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidCall {
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
    pub cpuid_call: CpuidCall,
    /// The [`CounterBlock`] of the counter vCPU (natively, thread), 0 if none.
    pub counter_addr: u64,
}

/// Why a measurement could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeasureError {
    /// The probe reads the counter and the request names none.
    NoCounter,
    /// The counter did not move (or answer a stamp) for [`counter::MAX_POLLS`] polls and
    /// [`counter::MAX_WAIT_CYCLES`].
    CounterStalled,
}

fn counter_block(request: &Request) -> Result<*mut CounterBlock, MeasureError> {
    match request.counter_addr {
        0 => Err(MeasureError::NoCounter),
        addr => Ok(addr as *mut CounterBlock),
    }
}

/// Reads the counter (another CPU writes it).
fn read_counter(block: *const CounterBlock) -> u64 {
    // SAFETY: `block` is the live counter block the caller named in its request; its
    // fields are atomics, shared by design.
    unsafe { &(*block).counter }.load(Ordering::Acquire)
}

/// Waits for the counter to move once, as TIMER's `sync = counter; while (counter == sync);`
/// does, but not for ever.
fn wait_for_tick(block: *const CounterBlock) -> Result<(), MeasureError> {
    let start = read_counter(block);
    wait_until(|| read_counter(block) != start)
}

/// Polls `done` until it says so, giving up after [`counter::MAX_POLLS`] polls and at
/// least [`counter::MAX_WAIT_CYCLES`] of the TSC (looked at once every 1024 polls).
fn wait_until(mut done: impl FnMut() -> bool) -> Result<(), MeasureError> {
    let started = read_tsc();
    let mut polls = 0u64;
    loop {
        for _ in 0..1024 {
            if done() {
                return Ok(());
            }
        }
        polls += 1024;
        if polls >= counter::MAX_POLLS && read_tsc().wrapping_sub(started) >= counter::MAX_WAIT_CYCLES {
            return Err(MeasureError::CounterStalled);
        }
    }
}

/// One cross-vCPU sample: asks the counter vCPU for its TSC and subtracts it from this
/// CPU's, read after the answer arrived (x86 stores are seen in order: the stamp is
/// there once the request reads zero).
fn cross_tsc_sample(block: *mut CounterBlock) -> Result<Cycles, MeasureError> {
    // SAFETY: `block` is the live counter block; its fields are atomics, shared by this
    // CPU and the counter's.
    let block = unsafe { &*block };
    block.stamp_request.store(counter::STAMP_REQUESTED, Ordering::Release);
    wait_until(|| block.stamp_request.load(Ordering::Acquire) == 0)?;
    let stamp = block.stamp.load(Ordering::Acquire);
    Ok(read_tsc().wrapping_sub(stamp) as Cycles)
}

/// Times `probe` `out.len()` times after the probe's warm-up; each sample is in TSC
/// cycles, negative where the TSC ran backwards. With a counter, `ticks` gets the counter
/// ticks over each sample (read just before and after it). The TIMER probes are measured
/// in pairs by [`measure_timer_pairs`]; here each runs alone.
pub fn measure(
    probe: Probe,
    request: &Request,
    out: &mut [Cycles],
    ticks: Option<&mut [Cycles]>,
) -> Result<(), MeasureError> {
    match probe {
        Probe::TimerCpuid | Probe::TimerLfence8 => {
            let (mut none, mut other_tsc, mut other_ticks): ([Cycles; 0], [Cycles; 0], [Cycles; 0]) = ([], [], []);
            let own_ticks = match ticks {
                Some(t) => t,
                None => &mut none,
            };
            let out = if probe == Probe::TimerCpuid {
                TimerOut {
                    cpuid_tsc: out,
                    cpuid_ticks: own_ticks,
                    lfence_tsc: &mut other_tsc,
                    lfence_ticks: &mut other_ticks,
                }
            } else {
                TimerOut {
                    cpuid_tsc: &mut other_tsc,
                    cpuid_ticks: &mut other_ticks,
                    lfence_tsc: out,
                    lfence_ticks: own_ticks,
                }
            };
            return measure_timer_pairs(request, out);
        }
        Probe::CrossTsc => {
            let block = counter_block(request)?;
            for _ in 0..probe.warmup(request.warmup) {
                cross_tsc_sample(block)?;
            }
            let mut ticks = ticks;
            for (i, slot) in out.iter_mut().enumerate() {
                let before = read_counter(block);
                *slot = cross_tsc_sample(block)?;
                if let Some(t) = ticks.as_deref_mut().and_then(|t| t.get_mut(i)) {
                    *t = read_counter(block).wrapping_sub(before) as Cycles;
                }
            }
            return Ok(());
        }
        _ => {}
    }
    let sample = || -> Cycles {
        let (leaf, subleaf) = (request.cpuid_leaf, request.cpuid_subleaf);
        // SAFETY: the routines above only touch registers (rbx is saved and restored) and
        // follow the System V calling convention.
        unsafe {
            match (probe, request.cpuid_call) {
                (Probe::Cpuid, CpuidCall::Instruction) => vmm_sample_cpuid(leaf, subleaf),
                (Probe::Cpuid, CpuidCall::Hypercall) => vmm_sample_hypercall(leaf, subleaf),
                (Probe::Nop, _) => vmm_sample_nop(),
                (Probe::Rdtsc, _) => vmm_sample_rdtsc(),
                (Probe::Lfence8, _) => vmm_sample_lfence8(),
                (Probe::CpuidUnfenced, CpuidCall::Instruction) => vmm_sample_cpuid_unfenced(leaf, subleaf),
                (Probe::CpuidUnfenced, CpuidCall::Hypercall) => vmm_sample_hypercall_unfenced(leaf, subleaf),
                (Probe::XorLoop, _) => vmm_sample_xor_loop(),
                (Probe::MsrCpuid, CpuidCall::Instruction) => vmm_sample_msr_cpuid(leaf, subleaf),
                (Probe::MsrCpuid, CpuidCall::Hypercall) => vmm_sample_msr_hypercall(leaf, subleaf),
                (Probe::TimerCpuid | Probe::TimerLfence8 | Probe::CrossTsc, _) => 0,
            }
        }
    };
    for _ in 0..probe.warmup(request.warmup) {
        core::hint::black_box(sample());
    }
    match (ticks, request.counter_addr) {
        (Some(ticks), addr) if addr != 0 => {
            let block = addr as *const CounterBlock;
            for (slot, tick) in out.iter_mut().zip(ticks.iter_mut()) {
                let before = read_counter(block);
                *slot = sample();
                *tick = read_counter(block).wrapping_sub(before) as Cycles;
            }
        }
        _ => {
            for slot in out.iter_mut() {
                *slot = sample();
            }
        }
    }
    Ok(())
}

/// The counter's rate where no exit can touch it: counter ticks and TSC cycles over at
/// least [`counter::RATE_CYCLES`], spent in a register-only loop that looks at the TSC
/// once every [`counter::RATE_LOOP`] iterations and reads the counter only at the two
/// ends (a counter polled all along runs slower; an emulating KVM slows the other vCPU
/// while it emulates a TSC read). Waits for the counter to start first. Returns cycles
/// and ticks.
///
/// `wall` (the PM timer) bounds the window as it bounds [`quiet_span`]: a trapped TSC
/// that hides its own exits barely moves, and the window then ends after
/// [`clocks::QUIET_MAX_PM_TICKS`] with the few cycles it saw (a rate the rules call
/// unknown, not a hang). It is read only after looks that saw the TSC stand (nearly)
/// still, so that an honest window has no exit in it.
pub fn measure_counter_rate(request: &Request, mut wall: impl FnMut() -> u32) -> Result<(u64, u64), MeasureError> {
    /// A look over which the TSC moved less than this stood (nearly) still.
    const STILL_CYCLES: u64 = 64;
    let block = counter_block(request)? as *const CounterBlock;
    wait_for_tick(block)?;
    let c0 = read_counter(block);
    let w0 = wall();
    let t0 = read_tsc();
    let mut t = t0;
    let mut still = 0u32;
    while t.wrapping_sub(t0) < counter::RATE_CYCLES {
        // The wall clock is read (an exit) only once looks have seen the TSC barely move:
        // an honest TSC advances hundreds of cycles over RATE_LOOP iterations, so the
        // window has no exit at all (a counter paused at every exit would otherwise be
        // measured slow here, and every tick over CPUID read as worth more).
        if still % clocks::QUIET_WALL_EVERY == clocks::QUIET_WALL_EVERY - 1
            && u64::from(wall().wrapping_sub(w0)) >= clocks::QUIET_MAX_PM_TICKS
        {
            break;
        }
        let before = t;
        countdown(counter::RATE_LOOP);
        t = read_tsc();
        if t.wrapping_sub(before) < STILL_CYCLES {
            still = still.wrapping_add(1);
        }
    }
    let c1 = read_counter(block);
    Ok((t.wrapping_sub(t0), c1.wrapping_sub(c0)))
}

/// Where [`measure_timer_pairs`] puts each pair's four figures.
pub struct TimerOut<'a> {
    pub cpuid_tsc: &'a mut [Cycles],
    pub cpuid_ticks: &'a mut [Cycles],
    pub lfence_tsc: &'a mut [Cycles],
    pub lfence_ticks: &'a mut [Cycles],
}

/// VMAware v2.7.0 `TIMER`'s sampling (src/vmaware.hpp L5663-5697): a warm-up of 1,000 ×
/// (CPUID(0), 8 × LFENCE), then per pair: two ticks waited for, the CPUID(0, 0) window,
/// two ticks, the 8 × LFENCE window — each window's ticks and TSC cycles kept. Pairs
/// where a window saw no tick are kept too (zero ticks; TIMER drops and retakes them: the
/// rule drops them, so that a stalled counter cannot hang the guest). As many pairs as the
/// longest of the four outputs; shorter outputs keep the first ones.
pub fn measure_timer_pairs(request: &Request, out: TimerOut<'_>) -> Result<(), MeasureError> {
    let block = counter_block(request)?;
    let counter = block as *const u64;
    let cpuid = |pair: &mut [Cycles; 2]| {
        // SAFETY: the routines read the counter, write two i64s to `pair` and save rbx.
        unsafe {
            match request.cpuid_call {
                CpuidCall::Instruction => vmm_timer_cpuid(counter, pair),
                CpuidCall::Hypercall => vmm_timer_hypercall(counter, pair),
            }
        }
    };
    let lfence = |pair: &mut [Cycles; 2]| {
        // SAFETY: as above.
        unsafe { vmm_timer_lfence8(counter, pair) }
    };
    let mut scratch = [0; 2];
    for _ in 0..counter::TIMER_WARMUP {
        cpuid(&mut scratch);
        lfence(&mut scratch);
    }
    let pairs = [
        out.cpuid_tsc.len(),
        out.cpuid_ticks.len(),
        out.lfence_tsc.len(),
        out.lfence_ticks.len(),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let put = |slot: &mut [Cycles], i: usize, value: Cycles| {
        if let Some(s) = slot.get_mut(i) {
            *s = value;
        }
    };
    for i in 0..pairs {
        wait_for_tick(block)?;
        wait_for_tick(block)?;
        let mut v = [0; 2];
        cpuid(&mut v);
        wait_for_tick(block)?;
        wait_for_tick(block)?;
        let mut r = [0; 2];
        lfence(&mut r);
        put(out.cpuid_tsc, i, v[0]);
        put(out.cpuid_ticks, i, v[1]);
        put(out.lfence_tsc, i, r[0]);
        put(out.lfence_ticks, i, r[1]);
    }
    Ok(())
}

/// Runs the counter loop on this thread until `block.stamp_request` reads
/// [`counter::STOP`]: the native runner's counter thread, the very code the counter vCPU
/// runs.
///
/// # Safety
/// `block` must point to a live [`CounterBlock`] that stays valid until this returns; the
/// loop touches nothing else.
pub unsafe fn run_counter_loop(block: *mut CounterBlock) {
    // SAFETY: as the caller promised; rax and rdx are clobbered, as the ABI allows.
    unsafe { vmm_counter_loop(block) }
}

/// The bytes of `vmm_counter_loop` in this binary: what [`counter::LOOP_CODE`] must equal.
pub fn counter_loop_bytes() -> &'static [u8] {
    // SAFETY: the two symbols delimit the routine in our own text section.
    unsafe {
        let start = vmm_counter_loop as *const u8;
        let end = &raw const vmm_counter_loop_end;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// Asks for one CPUID leaf along `path` and returns what came back.
pub fn query_cpuid(call: CpuidCall, leaf: u32, subleaf: u32) -> CpuidRecord {
    let mut regs = [0u32; 4];
    // SAFETY: the routines write exactly four u32s to a valid, exclusive pointer.
    unsafe {
        match call {
            CpuidCall::Instruction => vmm_cpuid_query(leaf, subleaf, &mut regs),
            CpuidCall::Hypercall => vmm_hypercall_query(leaf, subleaf, &mut regs),
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
pub fn cpuid_site_bytes() -> [[u8; 2]; 4] {
    // SAFETY: the symbols label instructions in our own text section, readable and at
    // least two bytes long (`cpuid` is `0f a2`); volatile, since a hypervisor may have
    // patched them behind the compiler's back.
    unsafe {
        [
            &raw const vmm_site_cpuid_probe,
            &raw const vmm_site_cpuid_unfenced,
            &raw const vmm_site_cpuid_query,
            &raw const vmm_site_cpuid_timer,
        ]
        .map(|site| [core::ptr::read_volatile(site), core::ptr::read_volatile(site.add(1))])
    }
}

/// The time-stamp counter, ordered after earlier instructions.
pub fn read_tsc() -> u64 {
    // SAFETY: reads the TSC into rax/rdx; touches nothing else.
    unsafe { vmm_read_tsc() }
}

/// `n` iterations of `dec; jnz`: time passes on the CPU with no memory access, no exit.
#[inline(always)]
fn countdown(n: u64) {
    // SAFETY: a register-only countdown.
    unsafe {
        core::arch::asm!(
            "2:",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) n => _,
            options(nomem, nostack)
        );
    }
}

/// The clocks read by `read` at the two ends of a quiet span: [`clocks::QUIET_CYCLES`]
/// of the TSC, or [`clocks::QUIET_MAX_PM_TICKS`] of the wall clock `wall` (the PM timer),
/// whichever comes first, in a register-only loop that looks at the TSC once every
/// [`clocks::QUIET_LOOP`] iterations and executes no CPUID. vmcheck calibrates the TSC
/// against one second of sleep; this is the same comparison, shorter and busy.
/// `read(end)` reads them; `end` is true at the span's end.
pub fn quiet_span(mut read: impl FnMut(bool) -> ClockReadings, mut wall: impl FnMut() -> u32) -> [ClockReadings; 2] {
    let start = read(false);
    let w0 = wall();
    let t0 = read_tsc();
    let mut t = t0;
    let mut looks = 0u32;
    while t.wrapping_sub(t0) < clocks::QUIET_CYCLES {
        if looks % clocks::QUIET_WALL_EVERY == clocks::QUIET_WALL_EVERY - 1
            && u64::from(wall().wrapping_sub(w0)) >= clocks::QUIET_MAX_PM_TICKS
        {
            break;
        }
        countdown(clocks::QUIET_LOOP);
        t = read_tsc();
        looks = looks.wrapping_add(1);
    }
    [start, read(true)]
}

/// Reads an MSR. Ring 0 only: a VM's guest, never a host process (a #GP there).
fn rdmsr(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads one MSR into edx:eax; the caller runs at CPL 0 in a VM whose KVM
    // knows the MSR (IA32_TSC and kvmclock's always are).
    unsafe { core::arch::asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The PM timer's count. A VM's guest only (port I/O faults in a host process).
pub fn read_pm_timer() -> u32 {
    let value: u32;
    // SAFETY: a port read the VMM answers; no memory is touched.
    unsafe { core::arch::asm!("in eax, dx", in("dx") ports::PM_TIMER, out("eax") value, options(nomem, nostack)) };
    value
}

/// `pvclock_vcpu_time_info` (Linux arch/x86/include/asm/pvclock-abi.h), as KVM writes it.
#[repr(C)]
struct PvclockTimeInfo {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<PvclockTimeInfo>() == 32);

fn kvmclock_page() -> *const PvclockTimeInfo {
    layout::KVMCLOCK_ADDR as *const PvclockTimeInfo
}

/// Asks KVM for kvmclock at [`layout::KVMCLOCK_ADDR`] and returns the TSC rate it states
/// in kHz (Linux `pvclock_tsc_khz`), or `None` where KVM never filled the page. A VM's
/// guest only, where the VMM found that KVM takes the MSR write (`flags::KVMCLOCK`).
pub fn enable_kvmclock() -> Option<u32> {
    let page = layout::KVMCLOCK_ADDR as *mut u8;
    // SAFETY: the kvmclock page is guest RAM the ABI reserves for it; nothing else uses it.
    unsafe { core::ptr::write_bytes(page, 0, core::mem::size_of::<PvclockTimeInfo>()) };
    let value = layout::KVMCLOCK_ADDR | 1;
    // SAFETY: a write of KVM's own clock MSR (the VMM probed that KVM takes it).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") clocks::MSR_KVM_SYSTEM_TIME_NEW, in("eax") value as u32,
            in("edx") (value >> 32) as u32, options(nostack))
    };
    // KVM fills the page before the next entry; an exit (a PM timer read) makes one.
    read_pm_timer();
    // SAFETY: the page KVM writes; volatile, since the host does.
    let info = unsafe { core::ptr::read_volatile(kvmclock_page()) };
    if info.version == 0 || info.tsc_to_system_mul == 0 {
        return None;
    }
    let mut khz: u64 = (1_000_000u64 << 32) / u64::from(info.tsc_to_system_mul);
    if info.tsc_shift < 0 {
        khz <<= -i32::from(info.tsc_shift);
    } else {
        khz >>= i32::from(info.tsc_shift);
    }
    u32::try_from(khz).ok()
}

/// kvmclock's time in ns, read as Linux's `pvclock_clocksource_read` does: the page's
/// system time plus the TSC since its timestamp, scaled, retried while KVM updates it.
fn read_kvmclock() -> u64 {
    loop {
        // SAFETY: the kvmclock page KVM keeps; fields read volatile, version around them.
        let (version, tsc_timestamp, system_time, mul, shift) = unsafe {
            let p = kvmclock_page();
            (
                core::ptr::read_volatile(&raw const (*p).version),
                core::ptr::read_volatile(&raw const (*p).tsc_timestamp),
                core::ptr::read_volatile(&raw const (*p).system_time),
                core::ptr::read_volatile(&raw const (*p).tsc_to_system_mul),
                core::ptr::read_volatile(&raw const (*p).tsc_shift),
            )
        };
        let tsc = read_tsc();
        // SAFETY: as above.
        let again = unsafe { core::ptr::read_volatile(&raw const (*kvmclock_page()).version) };
        if version & 1 != 0 || version != again {
            continue;
        }
        let mut delta = tsc.wrapping_sub(tsc_timestamp);
        if shift < 0 {
            delta >>= -i32::from(shift);
        } else {
            delta <<= i32::from(shift);
        }
        return system_time.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
    }
}

/// The TSC by RDTSCP (TSC_AUX, in ECX, dropped). In a VM only where the VMM set
/// `flags::RDTSCP_CLOCK` (an emulating KVM may stop the guest at it); natively where the
/// CPU has it (CPUID 80000001H:EDX[27]).
#[inline(never)] // one RDTSCP site in the binary, whatever the callers
pub fn read_tscp() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the TSC into edx:eax and TSC_AUX into ecx; touches nothing else.
    unsafe { core::arch::asm!("rdtscp", out("eax") lo, out("edx") hi, out("ecx") _, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Every clock of `which` ([`clocks`] bits; the TSC, MSR 0x10 and the PM timer always)
/// a VM offers its guest, back to back: the PM timer outermost, then kvmclock, APERF, MSR
/// 0x10, RDTSCP, RDTSC, and MPERF innermost (`end` reverses the order, so each clock's
/// span holds the next one's). Nothing that exits to the VMM (APERF, served by an evader)
/// sits between RDTSCP and RDTSC, the pair `tsc-rdtscp` compares to 1%; MPERF, which
/// counts at the TSC's rate at most, lies inside the TSC's span. A VM's guest only.
pub fn read_vm_clocks(which: u32, end: bool) -> ClockReadings {
    let mut r = ClockReadings::default();
    let has = |bit: u32| which & bit != 0;
    if end {
        if has(clocks::APERF_MPERF) {
            r.mperf = rdmsr(clocks::MSR_IA32_MPERF);
        }
        r.tsc = read_tsc();
        if has(clocks::RDTSCP) {
            r.rdtscp = read_tscp();
        }
        r.msr_tsc = rdmsr(clocks::MSR_IA32_TSC);
        if has(clocks::APERF_MPERF) {
            r.aperf = rdmsr(clocks::MSR_IA32_APERF);
        }
        if has(clocks::KVMCLOCK) {
            r.kvmclock_ns = read_kvmclock();
        }
        r.pm_timer = u64::from(read_pm_timer());
    } else {
        r.pm_timer = u64::from(read_pm_timer());
        if has(clocks::KVMCLOCK) {
            r.kvmclock_ns = read_kvmclock();
        }
        if has(clocks::APERF_MPERF) {
            r.aperf = rdmsr(clocks::MSR_IA32_APERF);
        }
        r.msr_tsc = rdmsr(clocks::MSR_IA32_TSC);
        if has(clocks::RDTSCP) {
            r.rdtscp = read_tscp();
        }
        r.tsc = read_tsc();
        if has(clocks::APERF_MPERF) {
            r.mperf = rdmsr(clocks::MSR_IA32_MPERF);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE: Request = Request {
        cpuid_leaf: 0,
        cpuid_subleaf: 0,
        warmup: 5,
        cpuid_call: CpuidCall::Instruction,
        counter_addr: 0,
    };

    #[test]
    fn every_native_probe_without_a_counter_fills_its_buffer_with_positive_cycle_counts() {
        // A VM's probes (an MSR) fault in a host process: the native runner leaves them out.
        for probe in Probe::ALL.into_iter().filter(|p| !p.needs_clocks()) {
            let mut samples = [0 as Cycles; 64];
            let measured = measure(probe, &NATIVE, &mut samples, None);
            if probe.needs_counter() {
                assert_eq!(measured, Err(MeasureError::NoCounter), "{probe:?}");
                continue;
            }
            assert_eq!(measured, Ok(()));
            assert!(samples.iter().all(|&s| s > 0 && s < 1 << 40), "{probe:?}: {samples:?}");
        }
    }

    #[test]
    fn the_counter_loop_in_this_binary_is_the_abis_loop_code() {
        assert_eq!(counter_loop_bytes(), &counter::LOOP_CODE[..]);
    }

    /// A host counter thread, as the native runner starts one.
    struct CounterThread {
        block: std::boxed::Box<CounterBlock>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl CounterThread {
        fn start() -> Self {
            let mut block = std::boxed::Box::<CounterBlock>::default();
            let addr = &raw mut *block as usize;
            // SAFETY: the block is freed only after the thread is joined (Drop below).
            let thread = std::thread::spawn(move || unsafe { run_counter_loop(addr as *mut CounterBlock) });
            while read_counter(&*block) == 0 {
                core::hint::spin_loop();
            }
            Self {
                block,
                thread: Some(thread),
            }
        }
        fn request(&self) -> Request {
            Request {
                counter_addr: &raw const *self.block as u64,
                ..NATIVE
            }
        }
    }

    impl Drop for CounterThread {
        fn drop(&mut self) {
            self.block.stamp_request.store(counter::STOP, Ordering::Release);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    #[test]
    fn with_a_counter_every_probe_records_ticks_and_the_counter_probes_run() {
        let counter = CounterThread::start();
        let request = counter.request();
        for probe in Probe::ALL.into_iter().filter(|p| !p.needs_clocks()) {
            let mut samples = [0 as Cycles; 200];
            let mut ticks = [-1 as Cycles; 200];
            assert_eq!(
                measure(probe, &request, &mut samples, Some(&mut ticks)),
                Ok(()),
                "{probe:?}"
            );
            assert!(ticks.iter().all(|&t| t >= 0), "{probe:?}: {ticks:?}");
            if probe == Probe::CrossTsc {
                // One host's TSC, read after the other CPU's: never behind it.
                assert!(samples.iter().all(|&s| s >= 0), "{samples:?}");
            } else {
                assert!(samples.iter().all(|&s| s > 0), "{probe:?}: {samples:?}");
            }
        }
        // Waiting for ticks and asking for stamps means the counter moved.
        let mut samples = [0 as Cycles; 50];
        let mut ticks = [0 as Cycles; 50];
        measure(Probe::TimerCpuid, &request, &mut samples, Some(&mut ticks)).unwrap();
        assert!(ticks.iter().sum::<Cycles>() > 0, "{ticks:?}");
    }

    #[test]
    fn timer_pairs_fill_all_four_outputs_and_a_stopped_counter_ends_with_an_error() {
        let counter = CounterThread::start();
        let request = counter.request();
        let (mut a, mut b, mut c, mut d) = ([0; 20], [0; 20], [0; 20], [0; 20]);
        measure_timer_pairs(
            &request,
            TimerOut {
                cpuid_tsc: &mut a,
                cpuid_ticks: &mut b,
                lfence_tsc: &mut c,
                lfence_ticks: &mut d,
            },
        )
        .unwrap();
        assert!(a.iter().chain(&c).all(|&t| t > 0));
        assert!(b.iter().chain(&d).all(|&t| t >= 0));
        let stalled = Request {
            counter_addr: &raw const *counter.block as u64,
            ..NATIVE
        };
        drop(counter);
        // The block is freed with the thread: a still block of our own stands in.
        let still = std::boxed::Box::<CounterBlock>::default();
        let stalled = Request {
            counter_addr: &raw const *still as u64,
            ..stalled
        };
        let mut one = [0; 1];
        assert_eq!(
            measure(Probe::CrossTsc, &stalled, &mut one, None),
            Err(MeasureError::CounterStalled)
        );
    }

    #[test]
    fn cpuid_query_returns_the_vendor_of_this_cpu() {
        let leaf0 = query_cpuid(CpuidCall::Instruction, 0, 0);
        let expected = core::arch::x86_64::__cpuid_count(0, 0);
        assert_eq!(
            (leaf0.eax, leaf0.ebx, leaf0.ecx, leaf0.edx),
            (expected.eax, expected.ebx, expected.ecx, expected.edx)
        );
    }

    #[test]
    fn unpatched_sites_hold_cpuid() {
        assert_eq!(cpuid_site_bytes(), [CPUID_OPCODE; 4]);
    }

    #[test]
    fn tsc_moves_forward() {
        let first = read_tsc();
        let second = read_tsc();
        assert!(second > first);
    }
}
