//! Launch benchmark: 100 VMs in a row, each booting the embedded payload for a short run.
//! Reports the median and p99 of setup time (VM creation to the first KVM_RUN) and the
//! process's peak RSS. Targets on the development host: setup median under 5 ms, peak
//! RSS under 30 MiB.
//!
//! `cargo bench -p vmm --bench launch` (add `-- --vms N` for another count).

use std::time::Duration;
use vmm::measure::{self, RunSpec};
use vmm::modes::Mode;
use vmm::stats;
use vmm::vm::loader::Payload;

/// Peak RSS of this process's address space (VmHWM). Not `getrusage`'s `ru_maxrss`,
/// which keeps the peak of the parent (cargo) across fork and exec.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vms = args
        .iter()
        .position(|a| a == "--vms")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100usize);
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** launch benchmark SKIPPED: /dev/kvm is absent ***");
        return;
    }
    let kvm = measure::open_kvm().expect("open /dev/kvm");
    let payload = Payload::embedded().expect("embedded payload");
    let spec = RunSpec {
        iterations: 100,
        warmup: 10,
        timeout: Duration::from_secs(30),
        ..RunSpec::new(Mode::HwAssist)
    };
    let mut setup_us = Vec::with_capacity(vms);
    let mut run_us = Vec::with_capacity(vms);
    for _ in 0..vms {
        let m = measure::measure(Some(&kvm), &payload, &spec, None).expect("a launch failed");
        setup_us.push(m.setup.map_or(0, |d| d.as_micros() as u64));
        run_us.push(m.run.as_micros() as u64);
    }
    let setup = stats::summarize(&setup_us).expect("at least one VM");
    let run = stats::summarize(&run_us).expect("at least one VM");
    let rss_mib = peak_rss_kib().map_or(f64::NAN, |kib| kib as f64 / 1024.0);
    println!(
        "launch benchmark: {vms} VMs in a row, {} iterations each (hw-assist)",
        spec.iterations
    );
    println!(
        "  setup_us  median {:>7}  p99 {:>7}  max {:>7}   (target: median < 5000)",
        setup.median, setup.p99, setup.max
    );
    println!("  run_us    median {:>7}  p99 {:>7}", run.median, run.p99);
    println!("  peak RSS  {rss_mib:.1} MiB   (target: < 30 MiB)");
}
