//! The guest/host ABI: memory map, ports, config block and result block.
//!
//! Both blocks are `#[repr(C)]` with explicit padding, so their layout is the same on both
//! sides and they can be copied as plain bytes. Any change here bumps [`ABI_VERSION`].

use core::mem::size_of;
use core::sync::atomic::AtomicU64;

/// Bumped whenever a layout or meaning below changes.
pub const ABI_VERSION: u32 = 8;

/// Guest physical memory map. The VMM identity-maps the first [`layout::IDENTITY_MAP_BYTES`]
/// with 2 MiB pages, so guest virtual and physical addresses are the same.
pub mod layout {
    /// Global descriptor table (null, code, data).
    pub const GDT_ADDR: u64 = 0x1000;
    /// Page-map level 4.
    pub const PML4_ADDR: u64 = 0x2000;
    /// Page-directory-pointer table.
    pub const PDPT_ADDR: u64 = 0x3000;
    /// Page directory (512 entries of 2 MiB: the first GiB).
    pub const PD_ADDR: u64 = 0x4000;
    /// The [`super::Config`] block the VMM writes before the first instruction.
    pub const CONFIG_ADDR: u64 = 0x5000;
    /// The [`super::CounterBlock`] of a run with a counter vCPU (`vmm run --vcpus 2`).
    pub const COUNTER_BLOCK_ADDR: u64 = 0x6000;
    /// Where the VMM puts [`super::counter::LOOP_CODE`] for the counter vCPU.
    pub const COUNTER_CODE_ADDR: u64 = 0x7000;
    /// The guest's kvmclock page (`pvclock_vcpu_time_info`, 32 bytes), between the
    /// counter's block and its code.
    pub const KVMCLOCK_ADDR: u64 = 0x6800;
    /// The counter vCPU's stack pointer: the one slot below holds the address of a `hlt`
    /// (at [`COUNTER_HALT_ADDR`]) for the loop's `ret` when asked to stop.
    pub const COUNTER_STACK_TOP: u64 = 0x7ff8;
    /// `hlt; jmp $-1`: where the counter vCPU ends.
    pub const COUNTER_HALT_ADDR: u64 = 0x7f00;
    /// Lowest address of the guest stack.
    pub const STACK_BOTTOM: u64 = 0x1_0000;
    /// The initial stack pointer (the stack grows down towards [`STACK_BOTTOM`]).
    pub const STACK_TOP: u64 = 0x8_0000;
    /// Where the payload's loadable segments start (the linker script's base).
    pub const PAYLOAD_START: u64 = 0x10_0000;
    /// Loadable segments must end below this address.
    pub const PAYLOAD_END: u64 = 0x40_0000;
    /// The [`super::ResultHeader`] followed by the samples.
    pub const RESULT_ADDR: u64 = 0x40_0000;
    /// How much of guest memory the page tables map.
    pub const IDENTITY_MAP_BYTES: u64 = 1 << 30;
    /// An address the page tables map (below [`IDENTITY_MAP_BYTES`]) and no RAM backs
    /// (guest memory is far smaller): where [`super::flags::STRAY_MMIO`] reads.
    pub const STRAY_MMIO_ADDR: u64 = 0x3000_0000;
    /// Guest RAM is a whole number of these (the page-table granule).
    pub const RAM_GRANULE: u64 = 2 << 20;
}

/// I/O ports the guest uses to talk to the VMM.
pub mod ports {
    /// COM1 data register: one byte of console output per write.
    pub const CONSOLE: u16 = 0x3f8;
    /// The guest writes a [`super::Status`] here (32-bit) when it is done.
    pub const DONE: u16 = 0xf4;
    /// Paravirtual CPUID: `out dx, eax` with the leaf in EAX and the subleaf in ECX; the
    /// VMM answers in RAX–RDX before the guest resumes.
    pub const HYPERCALL: u16 = 0xf6;
    /// Where `--trap io-patch` sends a patched CPUID: the VMM rewrites `0f a2` into
    /// `out imm8, al` (`e6 f7`), two bytes like CPUID, and emulates CPUID on the exit.
    /// An 8-bit port, so that it fits the immediate form.
    pub const CPUID_TRAP: u8 = 0xf7;
    /// Where an RDTSC-trapping evasion sends a patched RDTSC: `0f 31` becomes `out imm8,
    /// al` (`e6 f8`), and the VMM answers EDX:EAX from its virtual clock on the exit.
    pub const RDTSC_TRAP: u8 = 0xf8;
    /// The same for RDTSCP: `0f 01 f9` becomes `e6 f9 90` (the `out`, then a NOP), and
    /// the VMM answers EDX:EAX and ECX (TSC_AUX).
    pub const RDTSCP_TRAP: u8 = 0xf9;
    /// An ACPI PM timer, where QEMU's PIIX4/ICH9 put it (PMBASE 0x600 + 8): `in eax, dx`
    /// reads a 32-bit count at [`super::clocks::PM_TIMER_HZ`], kept by the VMM from the
    /// host's monotonic clock. The guest's wall clock, a clock no RDTSC trap touches.
    pub const PM_TIMER: u16 = 0x608;
    /// The CMOS/RTC index port, which a PC has and this VMM does not emulate: where
    /// [`super::flags::STRAY_PORT`] writes.
    pub const STRAY: u16 = 0x70;
}

/// The clocks a guest can read besides RDTSC, as [`ClockReadings`] records them.
pub mod clocks {
    /// The ACPI PM timer's rate (ACPI 6.5 §4.8.3.3: 3.579545 MHz).
    pub const PM_TIMER_HZ: u64 = 3_579_545;
    /// IA32_TIME_STAMP_COUNTER: the TSC read as an MSR (Intel SDM vol. 4 table 2-2).
    pub const MSR_IA32_TSC: u32 = 0x10;
    /// KVM's paravirtual clock: the guest writes its page's address | 1 here and KVM keeps
    /// a `pvclock_vcpu_time_info` there (Linux Documentation/virt/kvm/x86/msr.rst).
    pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    /// TSC cycles of the quiet span: a loop with no CPUID in it, the clocks read at its
    /// two ends (vmcheck's one-second calibration, shorter).
    pub const QUIET_CYCLES: u64 = 1 << 27;
    /// Register-only iterations between two looks at the TSC in the quiet span.
    pub const QUIET_LOOP: u64 = 10_000;
    /// The quiet span also ends after this much of the PM timer (0.1 s), looked at once
    /// every [`QUIET_WALL_EVERY`] looks at the TSC: a trapped RDTSC answered from a clock
    /// that hides its own exits barely moves, and some KVMs run a guest's loops far slower
    /// while its RDTSCs are trapped (~2-20 ms per 10,000 iterations on kvm_pvm).
    pub const QUIET_MAX_PM_TICKS: u64 = PM_TIMER_HZ / 10;
    pub const QUIET_WALL_EVERY: u32 = 16;
    /// [`super::ClockReadings`] fields read, as bits of [`super::ResultHeader::clocks`].
    pub const TSC: u32 = 1 << 0;
    pub const MSR_TSC: u32 = 1 << 1;
    pub const PM_TIMER: u32 = 1 << 2;
    pub const KVMCLOCK: u32 = 1 << 3;
    pub const RDTSCP: u32 = 1 << 4;
    pub const APERF_MPERF: u32 = 1 << 5;
    /// IA32_MPERF and IA32_APERF (Intel SDM vol. 4 table 2-2; AMD APM vol. 2 §17.3): the
    /// reference and the actual cycles counted while the core runs (MPERF at the TSC's
    /// rate where the TSC is invariant, stopped outside C0).
    pub const MSR_IA32_MPERF: u32 = 0xe7;
    pub const MSR_IA32_APERF: u32 = 0xe8;
}

/// One timing sample: the second timestamp minus the first, in TSC cycles, *signed*. A
/// negative sample means the guest's TSC ran backwards between the two reads, which no
/// bare-metal TSC does: it is reported as such, never wrapped into a huge positive count.
pub type Cycles = i64;

/// Marks a valid [`Config`] (`"VMMCONF1"` little-endian).
pub const CONFIG_MAGIC: u64 = u64::from_le_bytes(*b"VMMCONF1");
/// Marks a valid [`ResultHeader`] (`"VMMRSLT1"` little-endian).
pub const RESULT_MAGIC: u64 = u64::from_le_bytes(*b"VMMRSLT1");
/// Marks a [`PayloadInfo`] (`"VMMINFO1"` little-endian).
pub const PAYLOAD_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VMMINFO1");
/// The symbol of a payload's [`PayloadInfo`]: what it declares before it runs.
pub const PAYLOAD_INFO_SYMBOL: &str = "vmm_payload_info";

/// What a payload can do (bits of [`PayloadInfo::capabilities`]). The VMM reads them from
/// the ELF before running it and refuses what the payload cannot do.
pub mod capabilities {
    /// It asks for CPUID by hypercall when the config sets `flags::PARAVIRT_CPUID`.
    pub const PARAVIRT_CPUID: u32 = 1 << 0;
    /// It reports its own verdict in the result block.
    pub const VERDICT: u32 = 1 << 1;
    /// It honours `Config::probes` and `Config::iterations` like the built-in timing
    /// core (other payloads report what they measured, which may be less).
    pub const TIMING_CORE: u32 = 1 << 2;
    /// It fills the CPUID snapshot and site bytes when `flags::CPUID_SNAPSHOT` is set.
    pub const CPUID_SNAPSHOT: u32 = 1 << 3;
    /// It executes `rdtscp`. The VMM first probes whether this KVM can run `rdtscp` in a
    /// guest (an emulating KVM may fail on it) and refuses the run, saying so, where not.
    pub const RDTSCP: u32 = 1 << 4;
    /// It reads the counter vCPU's clock at `Config::counter_addr`: the VMM refuses to run
    /// it without one (`--vcpus 2`); its native twin starts a counter thread.
    pub const COUNTER: u32 = 1 << 5;

    /// Every capability and the name reports give it.
    pub const NAMES: [(u32, &str); 6] = [
        (PARAVIRT_CPUID, "paravirt-cpuid"),
        (VERDICT, "verdict"),
        (TIMING_CORE, "timing-core"),
        (CPUID_SNAPSHOT, "cpuid-snapshot"),
        (RDTSCP, "rdtscp"),
        (COUNTER, "counter"),
    ];
}

/// What a payload declares about itself, at the symbol [`PAYLOAD_INFO_SYMBOL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadInfo {
    /// [`PAYLOAD_INFO_MAGIC`].
    pub magic: u64,
    /// The [`ABI_VERSION`] it was built against.
    pub abi_version: u32,
    /// Bits of [`capabilities`].
    pub capabilities: u32,
    /// A short name for reports, NUL-padded.
    pub name: [u8; 32],
}

/// A clock the TSC offset does not touch: a second vCPU (natively, a host thread on
/// another CPU) runs [`counter::LOOP_CODE`], which adds one to `counter` per iteration,
/// as VMAware's `TIMER` counter thread does (v2.7.0: one `incq` and a load of a flag on
/// another cache line per iteration). Each field has a cache line of its own.
///
/// It also answers TSC stamp requests, for the cross-vCPU TSC probe: write
/// [`counter::STAMP_REQUESTED`] to `stamp_request`; the loop stores its TSC in `stamp`,
/// then zero in `stamp_request`. [`counter::STOP`] there makes the loop return.
///
/// Two CPUs share it, one of them running machine code: on the Rust side every field is
/// an atomic (a plain `mov` on x86), so no access is a data race by Rust's rules.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CounterBlock {
    pub counter: AtomicU64,
    pub pad0: [u64; 7],
    pub stamp_request: AtomicU64,
    pub pad1: [u64; 7],
    pub stamp: AtomicU64,
    pub pad2: [u64; 7],
}

/// The counter loop, defined once: the bytes the VMM runs on the counter vCPU, identical
/// to the native runner's `timing::vmm_counter_loop` (a test compares them).
pub mod counter {
    /// `stamp_request`: asks the loop for one TSC stamp.
    pub const STAMP_REQUESTED: u64 = 1;
    /// `stamp_request`: ends the loop (native runs; a guest never needs it).
    pub const STOP: u64 = 2;
    /// `void loop(CounterBlock *block /* rdi */)`:
    ///
    /// ```text
    /// 0:  inc qword [rdi]            ; counter += 1
    ///     mov rax, [rdi + 0x40]      ; stamp_request
    ///     test rax, rax
    ///     je 0b
    ///     cmp rax, STOP
    ///     je 1f
    ///     rdtsc
    ///     shl rdx, 32
    ///     or rax, rdx
    ///     mov [rdi + 0x80], rax      ; stamp
    ///     mov qword [rdi + 0x40], 0  ; answered
    ///     jmp 0b
    /// 1:  ret
    /// ```
    pub const LOOP_CODE: [u8; 45] = [
        0x48, 0xff, 0x07, // inc qword [rdi]
        0x48, 0x8b, 0x47, 0x40, // mov rax, [rdi+0x40]
        0x48, 0x85, 0xc0, // test rax, rax
        0x74, 0xf4, // je 0
        0x48, 0x83, 0xf8, 0x02, // cmp rax, 2
        0x74, 0x1a, // je ret
        0x0f, 0x31, // rdtsc
        0x48, 0xc1, 0xe2, 0x20, // shl rdx, 32
        0x48, 0x09, 0xd0, // or rax, rdx
        0x48, 0x89, 0x87, 0x80, 0x00, 0x00, 0x00, // mov [rdi+0x80], rax
        0x48, 0xc7, 0x47, 0x40, 0x00, 0x00, 0x00, 0x00, // mov qword [rdi+0x40], 0
        0xeb, 0xd4, // jmp 0
        0xc3, // ret
    ];
    /// `hlt; jmp $-1`, at [`super::layout::COUNTER_HALT_ADDR`].
    pub const HALT_CODE: [u8; 3] = [0xf4, 0xeb, 0xfd];
    /// Polls of the counter a guest makes waiting for it to move (or for a stamp) before
    /// it gives up with [`super::Status::CounterStalled`]: a stopped counter vCPU must not
    /// hang the measuring one. (VMAware's own loops wait forever.)
    pub const MAX_POLLS: u64 = 1 << 24;
    /// TSC cycles the built-in timing core waits for the counter (or a stamp) before it
    /// gives up with [`super::Status::CounterStalled`] (~3.5 s at 2.4 GHz): natively a
    /// poll takes a nanosecond, and [`MAX_POLLS`] is shorter than a busy host's scheduler
    /// can keep the counter thread waiting.
    pub const MAX_WAIT_CYCLES: u64 = 1 << 33;
    /// The counter's rate window: before any probe, with no exit in it, the guest reads
    /// the counter and the TSC, runs a register-only loop for at least this many TSC
    /// cycles and reads both again ([`super::ResultHeader::rate_cycles`]). Nothing shared
    /// is read in between: a counter polled all along counts several times slower (39
    /// against ~2 cycles per tick natively on the development host).
    pub const RATE_CYCLES: u64 = 4_000_000;
    /// Loop iterations between two looks at the TSC in the rate window.
    pub const RATE_LOOP: u64 = 1000;
    /// Iterations of the dependent XOR loop per `xor-loop` sample.
    pub const XOR_ITERATIONS: u64 = 256;
    /// VMAware v2.7.0's TIMER warm-up: 1,000 × (CPUID(0), then 8 × LFENCE).
    pub const TIMER_WARMUP: u32 = 1000;
}

/// Config flags (bits of [`Config::flags`]).
pub mod flags {
    /// Ask the VMM through the hypercall port instead of executing CPUID (paravirt).
    pub const PARAVIRT_CPUID: u32 = 1 << 0;
    /// Spin forever instead of measuring: exercises the VMM's watchdog.
    pub const HANG: u32 = 1 << 1;
    /// Execute `ud2` with no IDT: a triple fault, to exercise the VMM's fault handling.
    pub const FAULT: u32 = 1 << 2;
    /// Record what CPUID returns for [`super::CPUID_SNAPSHOT_LEAVES`] and read the bytes
    /// of the CPUID sites (the guest's view of its own code).
    pub const CPUID_SNAPSHOT: u32 = 1 << 3;
    /// Read the clocks a VM offers (MSR 0x10, the PM timer port, kvmclock) at the ends of
    /// the quiet span and of the probes, and run the probes that need them. Set by the
    /// VMM for a VM only: a host process has no ports or MSRs.
    pub const CLOCKS: u32 = 1 << 4;
    /// With [`CLOCKS`]: ask KVM for kvmclock too (the VMM found that this KVM takes the
    /// MSR write) and read it with the others.
    pub const KVMCLOCK: u32 = 1 << 5;
    /// Read guest-physical [`super::layout::STRAY_MMIO_ADDR`], mapped by the page tables
    /// but backed by no RAM: an MMIO exit no device answers, which the VMM must refuse.
    pub const STRAY_MMIO: u32 = 1 << 6;
    /// Write to port [`super::ports::STRAY`], where no device is: the VMM must refuse it.
    pub const STRAY_PORT: u32 = 1 << 7;
    /// With [`CLOCKS`]: read the TSC by RDTSCP too (the VMM found that this KVM runs
    /// `rdtscp` in a guest).
    pub const RDTSCP_CLOCK: u32 = 1 << 8;
    /// With [`CLOCKS`]: read APERF and MPERF too (the VMM serves their reads in this run:
    /// an evader passes them through; KVM alone raises #GP).
    pub const APERF_MPERF: u32 = 1 << 9;
}

/// A payload's own verdict, in [`ResultHeader::verdict`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadVerdict {
    /// The payload reported none.
    None = 0,
    Virtual = 1,
    Native = 2,
    Unsure = 3,
}

impl PayloadVerdict {
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => PayloadVerdict::None,
            1 => PayloadVerdict::Virtual,
            2 => PayloadVerdict::Native,
            3 => PayloadVerdict::Unsure,
            _ => return None,
        })
    }
}

/// Bytes of [`ResultHeader::reason`], its NUL terminator included.
pub const REASON_BYTES: usize = 120;

/// What the guest rings on [`ports::DONE`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Measurements are in the result block.
    Ok = 0,
    /// The config block's magic was wrong: the VMM did not write it.
    BadConfigMagic = 1,
    /// The config block was written for another ABI version.
    AbiMismatch = 2,
    /// The samples asked for do not fit the result area the VMM gave.
    ResultAreaTooSmall = 3,
    /// Iterations of zero, or no probe selected.
    BadConfig = 4,
    /// A probe needs the counter vCPU and the config names none (`counter_addr` is 0).
    NoCounter = 5,
    /// The counter vCPU stopped counting (or answering stamps) for [`counter::MAX_POLLS`]
    /// polls (the built-in timing core: and [`counter::MAX_WAIT_CYCLES`]).
    CounterStalled = 6,
}

impl Status {
    /// Decodes a status the guest wrote; `None` for a value no guest of this ABI sends.
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => Status::Ok,
            1 => Status::BadConfigMagic,
            2 => Status::AbiMismatch,
            3 => Status::ResultAreaTooSmall,
            4 => Status::BadConfig,
            5 => Status::NoCounter,
            6 => Status::CounterStalled,
            _ => return None,
        })
    }

    /// One line saying what the status means.
    pub fn describe(self) -> &'static str {
        match self {
            Status::Ok => "measurements complete",
            Status::BadConfigMagic => "the config block has no valid magic",
            Status::AbiMismatch => "the config block was written for another ABI version",
            Status::ResultAreaTooSmall => "the samples asked for do not fit the result area",
            Status::BadConfig => "the config asks for no iterations or no probe",
            Status::NoCounter => "a probe needs the counter vCPU, and the run has none (--vcpus 2)",
            Status::CounterStalled => "the counter vCPU stopped counting: the guest gave up waiting for it",
        }
    }
}

/// A native twin (the SDK's Linux build of a payload) exits with this plus its [`Status`]
/// when the detector stops with a status other than ok, as a guest rings it on the done
/// port; 0 when it measured; 2 when it could not read its config or write its results.
pub const NATIVE_TWIN_STATUS_BASE: u32 = 10;

/// The instructions the timing core can time, each between `lfence; rdtsc` pairs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Probe {
    /// CPUID with the configured leaf/subleaf (or its hypercall in paravirt mode).
    Cpuid = 0,
    /// A single NOP: the baseline of the classic test.
    Nop = 1,
    /// Nothing between the two timestamps: the measurement floor.
    Rdtsc = 2,
    /// Eight LFENCEs: a serialising baseline (the tsc-lfence-ratio rule's).
    Lfence8 = 3,
    /// `rdtsc; cpuid; rdtsc` with no fence and no warm-up, measured first: CPUID timed
    /// the way pafish and al-khaser time it (the fixed-threshold rule's).
    CpuidUnfenced = 4,
    /// VMAware v2.7.0 `TIMER`'s CPUID window: two counter ticks waited for, then
    /// `counter; cpuid(0, 0); counter`. Measured interleaved with [`Probe::TimerLfence8`],
    /// pair by pair, as TIMER does; needs the counter.
    TimerCpuid = 5,
    /// TIMER's reference window, after the CPUID one of each pair: two ticks, then
    /// `counter; 8 × lfence; counter`.
    TimerLfence8 = 6,
    /// This vCPU's TSC minus the counter vCPU's, read just after it answered a stamp
    /// request: never negative where both TSCs agree. Needs the counter.
    CrossTsc = 7,
    /// [`counter::XOR_ITERATIONS`] of a dependent XOR chain on a volatile (`x ^= i;
    /// x = (x << 1) ^ (x >> 3)`): work the TSC is checked against.
    XorLoop = 8,
    /// `rdmsr(IA32_TSC); cpuid; rdmsr(IA32_TSC)`, no fence: vmcheck's `TimestampTiming`
    /// window (the TSC read as MSR 0x10). A VM's only ([`flags::CLOCKS`]).
    MsrCpuid = 9,
}

impl Probe {
    /// Every probe, in the order they are measured and their samples are laid out in the
    /// result block. The unfenced probe comes first: it takes no warm-up, as the
    /// detectors it reproduces take none.
    pub const ALL: [Probe; 10] = [
        Probe::CpuidUnfenced,
        Probe::Cpuid,
        Probe::Nop,
        Probe::Rdtsc,
        Probe::Lfence8,
        Probe::TimerCpuid,
        Probe::TimerLfence8,
        Probe::CrossTsc,
        Probe::XorLoop,
        Probe::MsrCpuid,
    ];

    /// The bit of this probe in [`Config::probes`].
    pub const fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// The name used on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Probe::Cpuid => "cpuid",
            Probe::Nop => "nop",
            Probe::Rdtsc => "rdtsc",
            Probe::Lfence8 => "lfence8",
            Probe::CpuidUnfenced => "cpuid-unfenced",
            Probe::TimerCpuid => "timer-cpuid",
            Probe::TimerLfence8 => "timer-lfence8",
            Probe::CrossTsc => "cross-tsc",
            Probe::XorLoop => "xor-loop",
            Probe::MsrCpuid => "msr-cpuid",
        }
    }

    /// Whether it reads the counter vCPU's block (beyond the ticks every probe records
    /// when there is one).
    pub const fn needs_counter(self) -> bool {
        matches!(self, Probe::TimerCpuid | Probe::TimerLfence8 | Probe::CrossTsc)
    }

    /// Whether it reads what only a VM offers its guest (an MSR): run where
    /// [`flags::CLOCKS`] is set, never in a host process.
    pub const fn needs_clocks(self) -> bool {
        matches!(self, Probe::MsrCpuid)
    }

    /// Warm-up samples taken before this probe's kept ones.
    pub const fn warmup(self, configured: u32) -> u32 {
        match self {
            Probe::CpuidUnfenced => 0,
            Probe::TimerCpuid | Probe::TimerLfence8 => counter::TIMER_WARMUP,
            _ => configured,
        }
    }
}

/// A set of probes, as a bit mask of [`Probe::bit`].
pub fn probes_in(mask: u32) -> impl Iterator<Item = Probe> {
    Probe::ALL.into_iter().filter(move |p| mask & p.bit() != 0)
}

/// Leaves recorded when [`flags::CPUID_SNAPSHOT`] is set: basic, feature, extended
/// features, XSAVE, extended range, the hypervisor range and Hyper-V's partition
/// privileges (a root partition sets 0x40000003.EBX[0]; VMAware's `hyper_x()` reads it).
pub const CPUID_SNAPSHOT_LEAVES: [(u32, u32); 9] = [
    (0x0, 0),
    (0x1, 0),
    (0x7, 0),
    (0xd, 0),
    (0xd, 1),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x4000_0000, 0),
    (0x4000_0003, 0),
];

/// The block the VMM writes at [`layout::CONFIG_ADDR`] before the vCPU starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`CONFIG_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// Samples kept per probe.
    pub iterations: u32,
    /// Samples taken and dropped before those kept, per probe.
    pub warmup: u32,
    /// Which probes to run: bits of [`Probe::bit`].
    pub probes: u32,
    /// EAX for the CPUID probe.
    pub cpuid_leaf: u32,
    /// ECX for the CPUID probe.
    pub cpuid_subleaf: u32,
    /// The TSC rate in kHz as the VMM knows it (0: unknown): lets a payload turn
    /// durations into cycles (a detector that sleeps between samples spins this long).
    pub tsc_khz: u32,
    /// Guest-physical address of the result block.
    pub result_addr: u64,
    /// Bytes available at `result_addr`.
    pub result_capacity: u64,
    /// Guest-physical address of the [`CounterBlock`] (0: no counter in this run).
    pub counter_addr: u64,
}

/// One CPUID answer as the guest saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CpuidRecord {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Every clock the guest reads, read back to back (PM timer, kvmclock, APERF, MSR 0x10,
/// RDTSCP, RDTSC, MPERF; the reverse at a span's end): zero where [`ResultHeader::clocks`]
/// says it was not read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockReadings {
    /// RDTSC.
    pub tsc: u64,
    /// IA32_TSC by RDMSR (MSR 0x10).
    pub msr_tsc: u64,
    /// The PM timer's 32-bit count, or natively the host's monotonic clock in its ticks.
    pub pm_timer: u64,
    /// kvmclock's nanoseconds (`system_time` + the scaled TSC since `tsc_timestamp`).
    pub kvmclock_ns: u64,
    /// The TSC by RDTSCP (the same counter as RDTSC; an evader may trap one and not the
    /// other).
    pub rdtscp: u64,
    /// IA32_APERF and IA32_MPERF.
    pub aperf: u64,
    pub mperf: u64,
}

/// The header the guest writes at [`Config::result_addr`]; the samples follow it, one
/// [`Cycles`] (a signed 64-bit TSC difference) each, `iterations` per probe, probes in [`Probe::ALL`] order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResultHeader {
    /// [`RESULT_MAGIC`] once the guest has written the block.
    pub magic: u64,
    /// The guest's [`ABI_VERSION`].
    pub abi_version: u32,
    /// A [`Status`].
    pub status: u32,
    /// Samples per probe that follow.
    pub iterations: u32,
    /// The probes measured (bits of [`Probe::bit`]).
    pub probes: u32,
    /// TSC when the guest started measuring and when it finished.
    pub tsc_start: u64,
    pub tsc_end: u64,
    /// How many entries of `cpuid` are valid.
    pub cpuid_count: u32,
    /// Non-zero when `site_bytes` was filled in.
    pub site_bytes_valid: u32,
    /// The first two bytes at each CPUID site (`timing::CPUID_SITE_SYMBOLS` order), as
    /// the guest reads its own code: `0f a2` unless someone patched it.
    pub site_bytes: [[u8; 2]; 4],
    /// CPUID answers for [`CPUID_SNAPSHOT_LEAVES`], when asked for.
    pub cpuid: [CpuidRecord; CPUID_SNAPSHOT_LEAVES.len()],
    /// The payload's own verdict, a [`PayloadVerdict`] (0: none reported).
    pub verdict: u32,
    /// Non-zero when counter ticks follow the TSC samples: for every probe, in the same
    /// order, `iterations` tick counts (the counter read after the sample minus before).
    pub ticks: u32,
    /// The payload's score for its verdict in thousandths (its own scale; higher is more
    /// virtual). An integer: an emulating KVM runs no floating-point arithmetic in a guest
    /// (docs/sdk.md), so a payload that must run there computes in integers.
    pub score_milli: i64,
    /// One line of why, UTF-8, NUL-terminated.
    pub reason: [u8; REASON_BYTES],
    /// With a counter: TSC cycles and counter ticks over the rate window (a loop of
    /// [`counter::RATE_CYCLES`] before the probes, no exit in it): the counter's rate
    /// where nothing hides or pauses anything. Zero without a counter.
    pub rate_cycles: u64,
    pub rate_ticks: u64,
    /// The clocks read ([`clocks`] bits); zero where none were.
    pub clocks: u32,
    /// The TSC's rate kvmclock states (from its `tsc_to_system_mul` and `tsc_shift`, as
    /// Linux's `pvclock_tsc_khz`), in kHz; zero without kvmclock.
    pub kvmclock_tsc_khz: u32,
    /// The clocks at the two ends of the quiet span: a loop of
    /// [`clocks::QUIET_CYCLES`] with no CPUID, before the probes.
    pub quiet: [ClockReadings; 2],
    /// The clocks before the first probe and after the last: around every CPUID window.
    pub span: [ClockReadings; 2],
}

impl Default for ResultHeader {
    fn default() -> Self {
        Self {
            magic: 0,
            abi_version: 0,
            status: 0,
            iterations: 0,
            probes: 0,
            tsc_start: 0,
            tsc_end: 0,
            cpuid_count: 0,
            site_bytes_valid: 0,
            site_bytes: [[0; 2]; 4],
            cpuid: [CpuidRecord::default(); CPUID_SNAPSHOT_LEAVES.len()],
            verdict: 0,
            ticks: 0,
            score_milli: 0,
            reason: [0; REASON_BYTES],
            rate_cycles: 0,
            rate_ticks: 0,
            clocks: 0,
            kvmclock_tsc_khz: 0,
            quiet: [ClockReadings::default(); 2],
            span: [ClockReadings::default(); 2],
        }
    }
}

// Padding-free layouts: what the VMM writes is exactly what the guest reads.
const _: () = assert!(size_of::<Config>() == 64);
const _: () = assert!(size_of::<CounterBlock>() == 192);
// The counter vCPU's block, code, halt and stack fit between the config and the stack.
const _: () = assert!(layout::CONFIG_ADDR + size_of::<Config>() as u64 <= layout::COUNTER_BLOCK_ADDR);
const _: () = assert!(layout::COUNTER_BLOCK_ADDR + size_of::<CounterBlock>() as u64 <= layout::COUNTER_CODE_ADDR);
const _: () = assert!(layout::COUNTER_CODE_ADDR + counter::LOOP_CODE.len() as u64 <= layout::COUNTER_HALT_ADDR);
const _: () = assert!(layout::COUNTER_HALT_ADDR + counter::HALT_CODE.len() as u64 <= layout::COUNTER_STACK_TOP);
const _: () = assert!(layout::COUNTER_STACK_TOP + 8 <= layout::STACK_BOTTOM);
const _: () = assert!(size_of::<CpuidRecord>() == 24);
const _: () = assert!(size_of::<ClockReadings>() == 56);
const _: () =
    assert!(size_of::<ResultHeader>() == 56 + 24 * CPUID_SNAPSHOT_LEAVES.len() + 16 + REASON_BYTES + 16 + 8 + 4 * 56);
const _: () = assert!(layout::COUNTER_BLOCK_ADDR + size_of::<CounterBlock>() as u64 <= layout::KVMCLOCK_ADDR);
const _: () = assert!(layout::KVMCLOCK_ADDR + 32 <= layout::COUNTER_CODE_ADDR);
const _: () = assert!(size_of::<PayloadInfo>() == 48);

impl Config {
    /// The block's bytes, as the VMM copies them into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Config` is `repr(C)`, made of integers only and has no padding (asserted
        // above), so every byte is initialised.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// CPUIDs the built-in timing core executes for this config: each sample and warm-up
    /// of the probes that run one (the TIMER pair runs its CPUID window for either of its
    /// probes), and the snapshot's queries. What the VMM sizes its per-exit records by.
    pub fn timing_core_cpuids(&self) -> u64 {
        let (n, w) = (u64::from(self.iterations), self.warmup);
        let has = |probe: Probe| self.probes & probe.bit() != 0;
        let mut count = 0;
        for probe in [Probe::Cpuid, Probe::CpuidUnfenced, Probe::MsrCpuid] {
            if has(probe) {
                count += n + u64::from(probe.warmup(w));
            }
        }
        if has(Probe::TimerCpuid) || has(Probe::TimerLfence8) {
            count += n + u64::from(Probe::TimerCpuid.warmup(w));
        }
        if self.flags & flags::CPUID_SNAPSHOT != 0 {
            count += CPUID_SNAPSHOT_LEAVES.len() as u64;
        }
        count
    }

    /// Bytes the result block needs: the header and every sample asked for (twice with a
    /// counter: TSC cycles and counter ticks).
    pub fn result_bytes_needed(&self) -> u64 {
        let probes = u64::from(self.probes.count_ones());
        let clocks = if self.counter_addr != 0 { 2 } else { 1 };
        size_of::<ResultHeader>() as u64 + clocks * probes * u64::from(self.iterations) * size_of::<Cycles>() as u64
    }
}

impl PayloadInfo {
    /// Reads the info from the bytes at its symbol.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked; every bit pattern is a valid `PayloadInfo`.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    /// The name, up to its first NUL.
    pub fn name_text(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        &self.name[..end]
    }
}

impl ResultHeader {
    /// Reads a header from the bytes at the start of the result block.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked; every bit pattern is a valid `ResultHeader`
        // (integers only); `read_unaligned` copes with any alignment of `bytes`.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    /// The reason the payload gave, up to its NUL.
    pub fn reason_text(&self) -> &[u8] {
        let end = self.reason.iter().position(|&b| b == 0).unwrap_or(self.reason.len());
        &self.reason[..end]
    }

    /// Offset of the first sample of `probe` from the start of the result block, given the
    /// probes and iterations the header announces; `None` if the probe was not measured.
    pub fn sample_offset(&self, probe: Probe) -> Option<u64> {
        if self.probes & probe.bit() == 0 {
            return None;
        }
        let before = probes_in(self.probes).take_while(|p| *p != probe).count() as u64;
        Some(size_of::<Self>() as u64 + before * u64::from(self.iterations) * size_of::<Cycles>() as u64)
    }

    /// Offset of the first counter tick count of `probe`, where the header says ticks
    /// follow: after every probe's TSC samples, in the same order.
    pub fn tick_offset(&self, probe: Probe) -> Option<u64> {
        if self.ticks == 0 {
            return None;
        }
        let all = u64::from(self.probes.count_ones()) * u64::from(self.iterations) * size_of::<Cycles>() as u64;
        self.sample_offset(probe).map(|offset| offset + all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_offsets_follow_probe_order() {
        let header = ResultHeader {
            probes: Probe::Cpuid.bit() | Probe::Rdtsc.bit(),
            iterations: 10,
            ..Default::default()
        };
        let base = size_of::<ResultHeader>() as u64;
        assert_eq!(header.sample_offset(Probe::Cpuid), Some(base));
        assert_eq!(header.sample_offset(Probe::Nop), None);
        assert_eq!(header.sample_offset(Probe::Rdtsc), Some(base + 80));
        assert_eq!(header.tick_offset(Probe::Cpuid), None);
        let with_ticks = ResultHeader { ticks: 1, ..header };
        assert_eq!(with_ticks.tick_offset(Probe::Cpuid), Some(base + 160));
        assert_eq!(with_ticks.tick_offset(Probe::Rdtsc), Some(base + 240));
    }

    #[test]
    fn the_timing_cores_cpuids_count_every_probe_that_runs_one() {
        let config = Config {
            probes: Probe::Cpuid.bit() | Probe::CpuidUnfenced.bit() | Probe::Nop.bit(),
            iterations: 10,
            warmup: 3,
            flags: flags::CPUID_SNAPSHOT,
            ..Default::default()
        };
        // 10 + 3 fenced, 10 unfenced (no warm-up), the snapshot.
        assert_eq!(config.timing_core_cpuids(), 23 + CPUID_SNAPSHOT_LEAVES.len() as u64);
        let timer = Config {
            probes: Probe::TimerLfence8.bit(),
            flags: 0,
            ..config
        };
        assert_eq!(timer.timing_core_cpuids(), 10 + u64::from(counter::TIMER_WARMUP));
    }

    #[test]
    fn a_counter_doubles_the_samples_and_fields_keep_their_lines() {
        let config = Config {
            probes: 0b11,
            iterations: 10,
            counter_addr: layout::COUNTER_BLOCK_ADDR,
            ..Default::default()
        };
        assert_eq!(config.result_bytes_needed(), size_of::<ResultHeader>() as u64 + 320);
        assert_eq!(core::mem::offset_of!(CounterBlock, stamp_request), 0x40);
        assert_eq!(core::mem::offset_of!(CounterBlock, stamp), 0x80);
    }

    #[test]
    fn result_bytes_count_every_selected_probe() {
        let config = Config {
            probes: 0b111,
            iterations: 100,
            ..Default::default()
        };
        assert_eq!(config.result_bytes_needed(), size_of::<ResultHeader>() as u64 + 2400);
    }

    #[test]
    fn status_round_trips_and_rejects_unknown_values() {
        for status in [
            Status::Ok,
            Status::BadConfigMagic,
            Status::AbiMismatch,
            Status::BadConfig,
        ] {
            assert_eq!(Status::from_u32(status as u32), Some(status));
        }
        assert_eq!(Status::from_u32(99), None);
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let header = ResultHeader {
            magic: RESULT_MAGIC,
            iterations: 7,
            ..Default::default()
        };
        // SAFETY: plain-old-data view of a local value, as the guest writes it.
        let bytes = unsafe {
            core::slice::from_raw_parts((&header as *const ResultHeader).cast::<u8>(), size_of::<ResultHeader>())
        };
        assert_eq!(ResultHeader::from_bytes(bytes), Some(header));
        assert_eq!(ResultHeader::from_bytes(&bytes[..10]), None);
    }
}
