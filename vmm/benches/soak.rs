//! Soak benchmark: 1,000 VMs in one process, on every path this KVM takes, with the
//! process's file descriptors, threads and resident memory sampled every 100 VMs. Flat is
//! the goal: nothing a run leaves behind may accumulate over a long `validate`.
//!
//! `cargo bench -p vmm --bench soak` (add `-- --vms N` for another count).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic here fails it, loudly

use vmm::measure::{Measurer, RunSpec};
use vmm::modes::trap_emulate::Trap;
use vmm::modes::Path;
use vmm::vm::loader::Payload;

fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn main() {
    let vms: usize = std::env::args()
        .skip_while(|a| a != "--vms")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let measurer = Measurer::open();
    if measurer.kvm().is_err() {
        eprintln!("soak: SKIPPED: no usable /dev/kvm");
        return;
    }
    let payload = Payload::embedded().expect("the embedded payload");
    let paths = [
        Path::HwAssist,
        Path::TrapEmulate(Trap::IoPatch),
        Path::TrapEmulate(Trap::HwBreakpoint),
        Path::Paravirt,
    ];
    println!("soak: {vms} VMs of 200 samples, paths in turn: hw-assist, io-patch, hw-breakpoint, paravirt");
    println!(
        "{:>6} {:>6} {:>8} {:>10} {:>8}",
        "VMs", "fds", "threads", "RSS KiB", "failed"
    );
    let mut failed = 0;
    let mut rows = Vec::new();
    for i in 0..=vms {
        if i % 100 == 0 {
            let row = (
                open_fds(),
                status_field("Threads:").unwrap_or(0),
                status_field("VmRSS:").unwrap_or(0),
            );
            println!("{i:>6} {:>6} {:>8} {:>10} {failed:>8}", row.0, row.1, row.2);
            rows.push(row);
        }
        if i == vms {
            break;
        }
        let spec = RunSpec {
            iterations: 200,
            warmup: 10,
            ..RunSpec::new(paths[i % paths.len()])
        };
        if measurer.measure(&payload, &spec, None).is_err() {
            failed += 1;
        }
    }
    // After the first 100 (one-off setup: the watchdog thread, lazily allocated tables),
    // nothing may grow.
    let settled = &rows[1..];
    let flat = settled.windows(2).all(|w| w[1].0 <= w[0].0 && w[1].1 <= w[0].1);
    let (first, last) = (settled[0].2, settled[settled.len() - 1].2);
    println!(
        "fds and threads {}; RSS {first} -> {last} KiB ({:+.1}%)",
        if flat { "flat" } else { "GREW" },
        (last as f64 - first as f64) / first as f64 * 100.0
    );
}
