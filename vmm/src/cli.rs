//! The command line: what each subcommand and option means, in `--help`.

use crate::modes::trap_emulate::Trap;
use crate::modes::tsc_trap::TscTrapBy;
use crate::modes::Mode;
use clap::{Args, Parser, Subcommand, ValueEnum};
use guest_payload::Probe;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM testbed for CPUID timing: boot a tiny guest that times CPUID against NOP, and control what CPUID costs it",
    long_about = "vmm boots a minimal guest on /dev/kvm whose timing core measures CPUID against NOP with the TSC — \
the classic \"am I in a VM?\" test — and runs the very same timing core natively on the host for comparison.\n\n\
Start with `vmm doctor` to see what this host's KVM can do, then compare `vmm run --mode native`, \
`--mode hw-assist`, `--mode trap-emulate` and `--mode paravirt`.",
    after_help = "Exit status: 0 success, 1 a run or check failed (the message says why), 2 bad command line."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// When another vmm process on this host is timing on the CPU this one would time on:
    /// wait for it (saying so), fail, or off (time on it all the same). Every timed run
    /// takes an advisory lock on its CPU (and the counter's), held until the process ends;
    /// without --cpu a free CPU is chosen first. VMM_LOCK_DIR moves the lock files.
    #[arg(long, global = true, value_enum, default_value_t = crate::cpu_lock::CpuLockPolicy::Wait)]
    pub cpu_lock: crate::cpu_lock::CpuLockPolicy,

    /// When vmm runs as root, the user a payload's native twin runs as (default nobody),
    /// from a copy in a directory only that user may enter; `root` keeps root's
    /// privileges. Twins always start with no_new_privs, in a process group of their own.
    #[arg(long, global = true, value_name = "USER")]
    pub twin_user: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the timing core once, in a VM or natively, and report the statistics.
    Run(Box<RunArgs>),
    /// Native and every VM mode back to back: one table side by side, with each rule's verdict.
    Compare(CompareArgs),
    /// Measure this host natively (and in hw-assist, where KVM is there) and save the
    /// calibration the detector rules read with --calibration.
    Calibrate(CalibrateArgs),
    /// Score every detector rule over a matrix of modes × shaping × busyness (or a shard of
    /// it), optionally as a CI gate (--require, --junit).
    Validate(ValidateArgs),
    /// Add validation reports of one matrix (shards, or other hosts) into one report, with
    /// a per-host table beside the total.
    Merge(MergeArgs),
    /// Check /dev/kvm, the capabilities each mode needs, the CPU and its TSC.
    Doctor(DoctorArgs),
    /// Show what the VMM sees in a payload before running it: segments, entry, its
    /// declaration, every CPUID site found by decoding, and what each path would do.
    Inspect(InspectArgs),
    /// Follow one CPUID through a path, step by step: the guest instruction, the exit as
    /// KVM reports it, every call the VMM makes and its cost, the emulation, shaping, the
    /// re-entry, and a breakdown that adds up to the guest-visible cycles.
    Trace(Box<TraceArgs>),
}

/// The trap `run` and `trace` use when none is named: the debug registers leave the
/// guest's code as it was (a KVM that delivers no debug exits refuses it, naming the others).
pub const DEFAULT_TRAP: Trap = Trap::HwBreakpoint;

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The path to follow (with --trap for trap-emulate).
    #[arg(long, value_enum, default_value_t = Mode::TrapEmulate)]
    pub mode: Mode,

    /// How trap-emulate traps CPUID (the same default as `run`).
    #[arg(long, value_enum, default_value_t = DEFAULT_TRAP)]
    pub trap: Trap,

    /// Every path, one after the other (paths this host refuses are listed as such).
    #[arg(long)]
    pub all: bool,

    /// CPUIDs run before the one followed (caches and branch predictors warm); 100, as
    /// `run` warms up (a colder trace puts thousands of cycles more in the VMM's part).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub warmup: u32,

    /// Trace each path this many times (a fresh VM, or native run, each) and show the trace whose
    /// guest-visible cost is the median, with the range of all of them: one exit is noisy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=101))]
    pub repeat: u32,

    /// CPUID leaf (EAX); decimal or 0x-hex.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub leaf: u32,

    /// CPUID subleaf (ECX); decimal or 0x-hex.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub subleaf: u32,

    #[command(flatten)]
    pub shaping: ShapingArgs,

    /// Print one JSON document instead of the text.
    #[arg(long)]
    pub json: bool,

    /// Draw the paths side by side on one time axis, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub svg: Option<PathBuf>,

    /// Stop any guest that has not finished after this many seconds.
    #[arg(long, default_value_t = 60.0, value_parser = parse_timeout)]
    pub timeout: f64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The payload: a static x86-64 ELF64 (e.g. built with the SDK, docs/sdk.md).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Print one JSON document instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// What the detector rules are judged against, and what runs alongside.
#[derive(Debug, Args)]
pub struct DetectorArgs {
    /// Calibration file from `vmm calibrate`; without one the rules use documented defaults
    /// and say they are uncalibrated.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,

    /// Host threads burning CPU while the run measures (the seed's "busyness").
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=i64::from(crate::limits::MAX_BUSY)))]
    pub busy: u16,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Samples kept per probe, in each mode.
    #[arg(long, short = 'n', default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::limits::MAX_ITERATIONS)))]
    pub iterations: u32,

    /// Samples dropped first, per probe.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::limits::MAX_WARMUP)))]
    pub warmup: u32,

    /// Stop any guest that has not finished after this many seconds.
    #[arg(long, default_value_t = 60.0, value_parser = parse_timeout)]
    pub timeout: f64,

    #[command(flatten)]
    pub detector: DetectorArgs,

    /// Boot this ELF64 x86-64 payload (e.g. a detector built with the SDK, docs/sdk.md)
    /// instead of the embedded timing core; native runs use its twin, FILE.native.
    #[arg(long, value_name = "FILE")]
    pub payload: Option<PathBuf>,

    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Draw the runs on the NOP/CPUID plane, and CPUID histograms, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Stage these evasions on every VM path (a path where one cannot act is refused,
    /// said in the report); the native run is the baseline, unshaped. As `run --evade`.
    #[arg(long, visible_alias = "evader", value_delimiter = ',', value_name = "EVASION|FILE")]
    pub evade: Vec<String>,

    /// How the evasion's RDTSC trap is set on each VM path: as `run --tsc-trap`.
    #[arg(long, value_enum, default_value_t = TscTrapBy::IoPatch, value_name = "HOW")]
    pub tsc_trap: TscTrapBy,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Where to write the calibration.
    #[arg(long, short = 'o', default_value = "calibration.json", value_name = "FILE")]
    pub out: PathBuf,

    /// Runs per mode.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub runs: u32,

    /// Samples per probe in each run.
    #[arg(long, short = 'n', default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(10..=i64::from(crate::limits::MAX_ITERATIONS)))]
    pub iterations: u32,

    /// Skip the hw-assist runs (the seed line then keeps its default).
    #[arg(long)]
    pub native_only: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The experiment matrix (see configs/README.md): modes × shaping × busyness × repeats.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// Calibration file from `vmm calibrate` (else the rules' defaults).
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,

    /// Boot this ELF64 x86-64 payload (e.g. a detector built with the SDK, docs/sdk.md)
    /// in every cell instead of the embedded timing core; native cells use its twin,
    /// FILE.native. Its own verdict is scored as the rule `payload`.
    #[arg(long, value_name = "FILE")]
    pub payload: Option<PathBuf>,

    #[command(flatten)]
    pub report: ReportArgs,

    /// Run only shard K of N (1-based) of the matrix's jobs (cell × repeat): every job runs
    /// in exactly one of N shards; `vmm merge` adds their reports up. `auto` reads the
    /// shard from the batch engine: VMM_SHARD_INDEX (0-based) or Kubernetes'
    /// JOB_COMPLETION_INDEX with VMM_SHARD_COUNT; in a Slurm array the task's place in it,
    /// (SLURM_ARRAY_TASK_ID - MIN) / STEP of COUNT, or with VMM_SHARD_COUNT set the task ID
    /// itself (a re-run of one shard). Lists and disagreeing sources are refused.
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<String>,

    /// Repeat each cell until every rule's exact 95% interval of its flagged rate is at
    /// most this wide (0.1: each rate known to about ±0.05), up to the matrix's `repeats`
    /// (or --max-repeats) runs; a cell that reaches the bound first is named in the report.
    /// Cells whose verdicts never vary stop early; coin tosses run to the bound. Overrides
    /// the matrix's `precision`. Shards stop each on its own runs of a cell, so merged
    /// cells may hold more runs than one host needed; they still add up exactly.
    #[arg(long, value_name = "WIDTH", value_parser = parse_precision)]
    pub precision: Option<f64>,

    /// With --precision: the most runs a cell may take (the matrix's `repeats` otherwise).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::limits::MAX_REPEATS)))]
    pub max_repeats: Option<u32>,

    /// Accept a payload without its native twin (NAME.native beside NAME.elf): its native
    /// cells are refused either way, and without this option the validation then exits 1
    /// after writing its report, since a matrix without native runs has no false-positive
    /// rate and no native reference.
    #[arg(long)]
    pub allow_missing_twin: bool,

    /// Keep every run's whole report, its per-sample timings included, in DIR: one
    /// directory per cell (NNN-label), one run-R.json per run. What a matrix cell's verdict
    /// rests on, to trace by hand or to feed another tool. DIR is created if missing; a
    /// file already there is overwritten.
    #[arg(long, value_name = "DIR")]
    pub evidence: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Validation reports (`vmm validate -o FILE` or `--json`) of one matrix: shards of
    /// it, or whole runs on other hosts. At most 256 MiB each and 256 MiB in all (sizes
    /// checked before anything is read); a run outside the shards its report declares is
    /// refused, naming the file.
    #[arg(required = true, value_name = "REPORT.json")]
    pub reports: Vec<PathBuf>,

    /// Accept a merge that does not cover the whole matrix (a shard missing or
    /// interrupted): without it such a merge exits 1 after writing its outputs, naming
    /// the shards not given, and its requirements are judged on what is there.
    #[arg(long)]
    pub allow_partial: bool,

    #[command(flatten)]
    pub report: ReportArgs,
}

/// What `validate` and `merge` write, and what they must show to pass.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also write the JSON report to FILE (what `vmm merge` reads).
    #[arg(long, short = 'o', value_name = "FILE.json")]
    pub output: Option<PathBuf>,

    /// Also write the confusion matrices, per host and in total, as Markdown.
    #[arg(long, value_name = "FILE.md")]
    pub markdown: Option<PathBuf>,

    /// Draw every run on the NOP/CPUID plane, and CPUID histograms per mode, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Draw each rule's ROC curve (its own threshold marked, its AUC named) as SVG: native
    /// runs against virtual ones, or without native truth a sweep's lowest value against
    /// its highest. A matrix with neither draws nothing and exits 1, saying so.
    #[arg(long, value_name = "FILE.svg")]
    pub roc_plot: Option<PathBuf>,

    /// Draw each sweep's detection curves (share flagged against the swept value, 95%
    /// intervals as bars) as SVG. A matrix with no sweep draws nothing and exits 1.
    #[arg(long, value_name = "FILE.svg")]
    pub sweep_plot: Option<PathBuf>,

    /// Draw the detectors × evaders table (a row per rule, a column per thing the cells
    /// stage: caught, fooled, false alarm, quiet, unsure or not applicable, coloured) as
    /// SVG. A matrix that stages one thing only draws nothing and exits 1.
    #[arg(long, value_name = "FILE.svg")]
    pub matrix_plot: Option<PathBuf>,

    /// Write one JUnit test case per cell × rule (and per requirement), for CI systems.
    #[arg(long, value_name = "FILE.xml")]
    pub junit: Option<PathBuf>,

    /// Fail (exit 1, naming each) unless the requirement holds over the whole validation:
    /// RULE:tpr>=X or RULE:fpr<=X, e.g. robust:tpr>=0.99, or on a bound of the rate's exact
    /// 95% interval: RULE:tpr_lower>=X, RULE:fpr_upper<=X (tpr_upper, fpr_lower too). A
    /// rate that holds where its interval does not is passed and called unsupported,
    /// naming the runs it would take. Repeat for more; the matrix's `requirements` are
    /// judged too.
    #[arg(long, value_name = "RULE:METRIC>=X")]
    pub require: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// How CPUID reaches whoever answers it.
    #[arg(long, value_enum, default_value_t = Mode::HwAssist)]
    pub mode: Mode,

    /// How trap-emulate traps CPUID.
    #[arg(long, value_enum, default_value_t = DEFAULT_TRAP)]
    pub trap: Trap,

    /// Samples kept per probe.
    #[arg(long, short = 'n', default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::limits::MAX_ITERATIONS)))]
    pub iterations: u32,

    /// Samples taken and dropped before those kept, per probe.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::limits::MAX_WARMUP)))]
    pub warmup: u32,

    /// CPUID leaf (EAX) the cpuid probe asks for; decimal or 0x-hex.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub leaf: u32,

    /// CPUID subleaf (ECX); decimal or 0x-hex.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub subleaf: u32,

    /// Probes to time, comma-separated [default: cpuid-unfenced,cpuid,nop,rdtsc,lfence8;
    /// with --vcpus 2 also timer-cpuid,timer-lfence8,cross-tsc]. `cpuid-unfenced` is what
    /// fixed-threshold reads (as pafish and al-khaser time CPUID); `lfence8` is
    /// tsc-lfence-ratio's baseline; the timer pair is VMAware's TIMER; xor-loop is work
    /// to check the TSC against (slow on an emulating KVM: ask for it); msr-cpuid is
    /// vmcheck's MSR 0x10 window (a VM's only; a fifth CPUID site, which --trap
    /// hw-breakpoint cannot take with the other four).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub probes: Vec<ProbeArg>,

    /// vCPUs: 2 adds a counter vCPU on another host CPU spinning `counter++` in shared
    /// memory, a clock the TSC offset does not touch (natively: a host thread). Every
    /// probe is then recorded in TSC cycles and in counter ticks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub vcpus: u8,

    #[arg(long, visible_alias = "evader", value_delimiter = ',', value_name = "EVASION|FILE", help = crate::shaping::registry::help())]
    pub evade: Vec<String>,

    /// How an evasion that traps RDTSC/RDTSCP traps them: io-patch rewrites each site into
    /// a port I/O (any number of sites, every KVM; the guest can see the patch);
    /// hw-breakpoint sets an execution breakpoint on each in DR0-DR3 (at most four, fewer
    /// beside --trap hw-breakpoint's CPUID sites; the code untouched; a KVM that delivers
    /// debug exits). Only with such an evasion.
    #[arg(long, value_enum, default_value_t = TscTrapBy::IoPatch, value_name = "HOW")]
    pub tsc_trap: TscTrapBy,

    /// Stop a guest that has not finished after this many seconds.
    #[arg(long, default_value_t = 60.0, value_parser = parse_timeout)]
    pub timeout: f64,

    /// Load this ELF64 x86-64 payload instead of the embedded one.
    #[arg(long, value_name = "FILE")]
    pub payload: Option<PathBuf>,

    /// Time on this host CPU: the native runner and vCPU 0 are pinned there (default: the
    /// last allowed CPU that no other vmm process is timing on; see --cpu-lock).
    #[arg(long)]
    pub cpu: Option<usize>,

    #[command(flatten)]
    pub shaping: ShapingArgs,

    #[command(flatten)]
    pub detector: DetectorArgs,

    #[command(flatten)]
    pub output: OutputArgs,

    /// Also find, per timing rule, the fewest samples that decide its verdict: the run's
    /// samples resampled 20 times at each size from 5 up, the smallest size from which 95%
    /// of resamples agree with the whole run (seconds on a long run).
    #[arg(long)]
    pub samples_to_decision: bool,

    /// Make the guest misbehave on purpose, to see the VMM cope. The embedded timing
    /// core's behaviour: a payload of your own runs as it was written, so the two conflict.
    #[arg(long, value_enum, help_heading = "Testing the VMM", conflicts_with = "payload")]
    pub misbehave: Option<Misbehaviour>,
}

/// Latency shaping: what a CPUID exit handled by the VMM appears to cost the guest.
/// Only for --mode trap-emulate and paravirt; at most one kind per run.
#[derive(Debug, Args)]
#[group(skip)]
#[command(next_help_heading = "Latency shaping (trap-emulate, paravirt)")]
pub struct ShapingArgs {
    /// Spin this many nanoseconds in the exit handler: real, wall-clock latency.
    #[arg(long, group = "shaping-kind", value_name = "NS", value_parser = clap::value_parser!(u64).range(1..=crate::limits::MAX_INJECT_NS))]
    pub inject_ns: Option<u64>,

    /// Spin this many TSC cycles in the exit handler.
    #[arg(long, group = "shaping-kind", value_name = "CYCLES", value_parser = clap::value_parser!(u64).range(1..=crate::limits::MAX_SHAPING_CYCLES))]
    pub inject_cycles: Option<u64>,

    /// Move the guest TSC forward by this many cycles per exit, without spending the time
    /// (needs a KVM that honours TSC moves; probed).
    #[arg(long, group = "shaping-kind", value_name = "CYCLES", value_parser = clap::value_parser!(u64).range(1..=crate::limits::MAX_SHAPING_CYCLES))]
    pub virtual_inject_cycles: Option<u64>,

    /// Hide the exit: move the guest TSC back so each CPUID costs the guest only the
    /// target (needs a KVM that honours TSC moves; probed).
    #[arg(long, group = "shaping-kind")]
    pub hide: bool,

    /// Target cost for --hide, in cycles [default: the native CPUID median, measured at start].
    #[arg(long, value_name = "CYCLES", requires = "hide", value_parser = clap::value_parser!(u64).range(0..=crate::limits::MAX_SHAPING_CYCLES))]
    pub target_cycles: Option<u64>,

    /// Draw each exit's guest-visible cost from a profile modelled on published figures: a
    /// built-in name (vtx-hw-assist, paravirt-hypercall, kvm-userspace-exit-2012,
    /// trap-heavy-nested, nested-kvm-on-hyperv, nested-kvm-on-hyperv-evmcs, hyperv-root,
    /// emulator-qemu-tcg, emulator-kvm-pvm) or a JSON file; configs/profiles/README.md has
    /// each one's source.
    #[arg(long, group = "shaping-kind", value_name = "NAME|FILE")]
    pub profile: Option<String>,

    /// Seed for --profile draws: the same seed, the same targets.
    #[arg(long, default_value_t = 0x5eed, requires = "profile")]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Include every raw sample in the JSON.
    #[arg(long, requires = "json")]
    pub raw: bool,

    /// Also write the raw samples to FILE as CSV (probe,index,cycles).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,

    /// Show what the guest writes to its serial console (port 0x3f8) on stderr.
    #[arg(long)]
    pub console: bool,

    /// Draw the run on the NOP/CPUID plane with each rule's line, and its CPUID
    /// histogram, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProbeArg {
    /// CPUID with --leaf/--subleaf.
    Cpuid,
    /// One NOP: the baseline.
    Nop,
    /// Nothing between the timestamps: the measurement floor.
    Rdtsc,
    /// Eight LFENCEs: the serialising baseline of the tsc-lfence-ratio rule.
    Lfence8,
    /// `rdtsc; cpuid; rdtsc` unfenced, no warm-up, measured first (as pafish times CPUID).
    CpuidUnfenced,
    /// VMAware TIMER's CPUID(0) window in counter ticks (needs --vcpus 2).
    TimerCpuid,
    /// VMAware TIMER's 8×LFENCE window, paired with timer-cpuid (needs --vcpus 2).
    TimerLfence8,
    /// This vCPU's TSC minus the counter vCPU's (needs --vcpus 2).
    CrossTsc,
    /// A dependent XOR chain of 256 iterations: retired work against the TSC.
    XorLoop,
    /// `rdmsr(0x10); cpuid; rdmsr(0x10)`: vmcheck's TimestampTiming window (a VM's only).
    MsrCpuid,
}

impl From<ProbeArg> for Probe {
    fn from(arg: ProbeArg) -> Self {
        match arg {
            ProbeArg::Cpuid => Probe::Cpuid,
            ProbeArg::Nop => Probe::Nop,
            ProbeArg::Rdtsc => Probe::Rdtsc,
            ProbeArg::Lfence8 => Probe::Lfence8,
            ProbeArg::CpuidUnfenced => Probe::CpuidUnfenced,
            ProbeArg::TimerCpuid => Probe::TimerCpuid,
            ProbeArg::TimerLfence8 => Probe::TimerLfence8,
            ProbeArg::CrossTsc => Probe::CrossTsc,
            ProbeArg::XorLoop => Probe::XorLoop,
            ProbeArg::MsrCpuid => Probe::MsrCpuid,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Misbehaviour {
    /// Spin forever instead of measuring: the watchdog must stop it.
    Hang,
    /// Execute ud2 with no IDT: a triple fault the VMM must report.
    Fault,
    /// Read memory the page tables map and no RAM backs: an MMIO exit the VMM refuses.
    Mmio,
    /// Write to a port with no device behind it (0x70, a PC's CMOS): the VMM refuses it.
    Port,
}

/// A u32 in decimal or with a 0x prefix.
pub fn parse_u32(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("`{text}` is not a 32-bit number (decimal, or hex with 0x)"))
}

/// An interval's width: a finite number strictly between 0 and 1.
fn parse_precision(text: &str) -> Result<f64, String> {
    let width: f64 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if width.is_finite() && width > 0.0 && width < 1.0 {
        Ok(width)
    } else {
        Err(format!(
            "{text}: an interval's width, between 0 and 1 exclusive (0.1: every rate known to ±0.05)"
        ))
    }
}

fn parse_timeout(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    use crate::limits::{MAX_TIMEOUT_S, MIN_TIMEOUT_S};
    if !(MIN_TIMEOUT_S..=MAX_TIMEOUT_S).contains(&seconds) {
        return Err(format!(
            "the timeout must be between {MIN_TIMEOUT_S} and {MAX_TIMEOUT_S} seconds, not {seconds}"
        ));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn numbers_parse_in_decimal_and_hex() {
        assert_eq!(parse_u32("0x40000000"), Ok(0x4000_0000));
        assert_eq!(parse_u32("13"), Ok(13));
        assert!(parse_u32("0xzz").is_err());
        assert!(parse_u32("-1").is_err());
    }

    #[test]
    fn absurd_values_are_refused_by_the_parser() {
        for args in [
            &["vmm", "run", "--iterations", "0"][..],
            &["vmm", "run", "--iterations", "99999999999"],
            &["vmm", "run", "--mode", "warp-drive"],
            &["vmm", "run", "--timeout", "0"],
            &["vmm", "run", "--probes", "cpuid,teleport"],
            &["vmm", "run", "--hide", "--inject-ns", "10"],
            &["vmm", "run", "--target-cycles", "10"],
            &["vmm", "run", "--trap", "jump"],
            &["vmm", "run", "--busy", "100000"],
            &["vmm", "run", "--hide", "--target-cycles", "9223372036854775808"],
            &["vmm", "run", "--warmup", "4000000000"],
            &["vmm", "validate"],
            &["vmm", "calibrate", "--runs", "1"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} was accepted");
        }
    }
}
