//! Exit-path benchmark: what each userspace path costs the guest, against the floor of
//! its exit kind, in one run of this process.
//!
//! For each path the VMM handles (trap-emulate with each trap, paravirt), with registers
//! through KVM_CAP_SYNC_REGS (where offered) and, for comparison, through KVM_GET/SET_REGS:
//! - `cpuid−floor`: the guest-visible CPUID median over the RDTSC floor's median;
//! - `handler`: the VMM's median time per CPUID exit (KVM_RUN return to next KVM_RUN);
//! - `bare`: the same with each exit only stepped over (RIP advanced through the same
//!   register path, nothing answered): the round trip of the exit kind, the path's floor;
//! - `ratio`: cpuid−floor over bare. Goal on the development host: ≤ 1.1 for every path.
//!
//! `cargo bench -p vmm --bench exits` (add `-- -n N` for another sample count).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic here fails it, loudly

use std::time::Duration;
use vmm::measure::{Measurer, RunSpec};
use vmm::modes::trap_emulate::Trap;
use vmm::modes::Path;
use vmm::stats;
use vmm::vm::handler::ExitKind;
use vmm::vm::kvm::KvmContext;
use vmm::vm::loader::Payload;
use vmm::vm::vcpu::RegisterAccess;

const PATHS: [Path; 4] = [
    Path::TrapEmulate(Trap::HwBreakpoint),
    Path::TrapEmulate(Trap::Int3Patch),
    Path::TrapEmulate(Trap::IoPatch),
    Path::Paravirt,
];

struct Figures {
    cpuid_over_floor: i64,
    handler: u64,
}

fn measure(measurer: &Measurer, payload: &Payload, path: Path, iterations: u32, bare: bool) -> Result<Figures, String> {
    let spec = RunSpec {
        iterations,
        warmup: 200,
        probes: guest_payload::Probe::Cpuid.bit() | guest_payload::Probe::Rdtsc.bit(),
        snapshot: false,
        timeout: Duration::from_secs(300),
        bare_exits: bare,
        ..RunSpec::new(path)
    };
    let m = measurer.measure(payload, &spec, None).map_err(|e| e.to_string())?;
    let median = |p: guest_payload::Probe| m.results.samples.get(&p).map_or(0, |s| stats::median(s));
    let kind = if path == Path::Paravirt {
        ExitKind::CpuidHypercall
    } else {
        ExitKind::CpuidTrap
    };
    Ok(Figures {
        cpuid_over_floor: median(guest_payload::Probe::Cpuid) - median(guest_payload::Probe::Rdtsc),
        handler: stats::median(m.exits.handler_cycles(kind)),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations = args
        .iter()
        .position(|a| a == "-n")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000u32);
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** exits benchmark SKIPPED: /dev/kvm is absent ***");
        return;
    }
    let payload = Payload::embedded().expect("embedded payload");
    let native = KvmContext::open().expect("open /dev/kvm").registers;
    println!("exits benchmark: {iterations} CPUID samples per run, medians in TSC cycles (this KVM offers {native:?})");
    let sync = Measurer::with_kvm(KvmContext::open());
    let ioctls = Measurer::with_kvm(KvmContext::open().map(|k| k.with_register_access(RegisterAccess::Ioctls)));
    println!(
        "{:<28} {:>10} {:>10} | {:>11} {:>8} {:>6} | {:>11} {:>8} {:>6}",
        "path", "floor", "floor hdl", "sync: c-f", "handler", "ratio", "ioctls: c-f", "handler", "ratio"
    );
    for path in PATHS {
        let row = || -> Result<String, String> {
            // The floor: exits stepped over through the cheapest register path there is.
            let floor = measure(&sync, &payload, path, iterations, true)?;
            let full = measure(&sync, &payload, path, iterations, false)?;
            let old = measure(&ioctls, &payload, path, iterations, false)?;
            let ratio = |f: &Figures| f.cpuid_over_floor as f64 / floor.cpuid_over_floor.max(1) as f64;
            Ok(format!(
                "{:>10} {:>10} | {:>11} {:>8} {:>5.2}x | {:>11} {:>8} {:>5.2}x",
                floor.cpuid_over_floor,
                floor.handler,
                full.cpuid_over_floor,
                full.handler,
                ratio(&full),
                old.cpuid_over_floor,
                old.handler,
                ratio(&old)
            ))
        };
        match row() {
            Ok(figures) => println!("{:<28} {figures}", path.name()),
            Err(why) => println!("{:<28} refused: {why}", path.name()),
        }
    }
    println!("c-f: guest-visible CPUID median minus the RDTSC floor's; handler: VMM cycles per CPUID exit");
    match trapped_rdtsc(&sync, &payload, iterations) {
        Ok(line) => println!("{line}"),
        Err(why) => println!("rdtsc-trap refused: {why}"),
    }
}

/// A trapped RDTSC against the bare port-I/O round trip (io-patch, stepped over): the
/// trap's extra cost per `rdtsc; rdtsc` sample (one round trip shows in each) over the bare
/// round trip's guest-visible cost, and its handler over the bare handler. Goal: ≤ 1.1.
fn trapped_rdtsc(measurer: &Measurer, payload: &Payload, iterations: u32) -> Result<String, String> {
    let io = Path::TrapEmulate(Trap::IoPatch);
    let bare = measure(measurer, payload, io, iterations, true)?;
    let rdtsc_median = |evade: &str| -> Result<(i64, u64), String> {
        let spec = RunSpec {
            iterations,
            warmup: 200,
            probes: guest_payload::Probe::Rdtsc.bit(),
            snapshot: false,
            timeout: Duration::from_secs(300),
            evasions: vmm::shaping::registry::Evasions::parse([evade]).map_err(|e| e.to_string())?,
            ..RunSpec::new(io)
        };
        let m = measurer.measure(payload, &spec, None).map_err(|e| e.to_string())?;
        let samples = m
            .results
            .samples
            .get(&guest_payload::Probe::Rdtsc)
            .cloned()
            .unwrap_or_default();
        Ok((
            stats::median(&samples),
            stats::median(m.exits.handler_cycles(ExitKind::TscTrap)),
        ))
    };
    let (plain, _) = rdtsc_median("none")?;
    let (trapped, handler) = rdtsc_median("rdtsc-trap")?;
    let extra = trapped - plain;
    Ok(format!(
        "rdtsc-trap: rdtsc;rdtsc {plain} -> {trapped} (+{extra}) against the bare io-patch round trip {} ({:.2}x); \
         handler {handler} against the bare handler {} ({:.2}x)",
        bare.cpuid_over_floor,
        extra as f64 / bare.cpuid_over_floor.max(1) as f64,
        bare.handler,
        handler as f64 / bare.handler.max(1) as f64
    ))
}
