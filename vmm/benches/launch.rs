//! Launch benchmark: VMs in a row, each booting the embedded payload for a short run.
//! Reports setup time (VM creation to the first KVM_RUN) against two floors measured in
//! the same run: a bare VM built with kvm-ioctls calls alone (same memory, same payload
//! bytes, same registers), and a minimal C program (`launch/bare_vm.c`, built here with
//! `cc -O2`: 4 MiB, one vCPU, KVM_SET_CPUID2, sregs, regs and the first KVM_RUN of a `hlt`).
//! Also the process's peak RSS. Goals on the development host: setup within 1.3x of the C
//! floor, peak RSS under 30 MiB.
//!
//! `cargo bench -p vmm --bench launch` (add `-- --vms N` for another count).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic here fails it, loudly

use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::arch::x86_64::regs;
use vmm::measure::{Measurer, RunSpec};
use vmm::modes::Path;
use vmm::stats;
use vmm::vm::kvm::KvmContext;
use vmm::vm::loader::Payload;
use vmm::vm::memory;

/// Peak RSS of this process's address space (VmHWM). Not `getrusage`'s `ru_maxrss`,
/// which keeps the peak of the parent (cargo) across fork and exec.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The same VM with kvm-ioctls calls only, timed to the point just before KVM_RUN.
/// `supported` is KVM_GET_SUPPORTED_CPUID, fetched once per process as any VMM would.
fn bare_vm_setup(kvm: &KvmContext, supported: &kvm_bindings::CpuId, payload: &Payload, spec: &RunSpec) -> Duration {
    let started = Instant::now();
    let config = spec.guest_config();
    let ram = memory::ram_size_for(&config).expect("RAM size");
    let vm = kvm.kvm.create_vm().expect("KVM_CREATE_VM");
    let guest = memory::allocate(ram).expect("guest RAM");
    for (slot, region) in guest.iter().enumerate() {
        let info = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `guest` outlives `vm` in this function.
        unsafe { vm.set_user_memory_region(info) }.expect("memory region");
    }
    payload.load_into(&guest).expect("payload");
    memory::write_boot_structures(&guest, &config).expect("boot structures");
    let vcpu = vm.create_vcpu(0).expect("vCPU");
    vcpu.set_cpuid2(supported).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    regs::setup_long_mode(&mut sregs);
    vcpu.set_sregs(&sregs).expect("sregs");
    vcpu.set_regs(&regs::entry_registers(payload.entry)).expect("regs");
    let setup = started.elapsed();
    drop(vcpu);
    drop(vm);
    setup
}

/// The C floor: `bare_vm.c` built with the system's C compiler; `Err` says why not.
fn build_c_floor(dir: &std::path::Path) -> Result<std::path::PathBuf, String> {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/launch/bare_vm.c");
    let binary = dir.join("bare_vm");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = std::process::Command::new(&cc)
        .args(["-O2", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .map_err(|e| format!("{cc}: {e}"))?;
    if !built.success() {
        return Err(format!("{cc} failed on {}", source.display()));
    }
    Ok(binary)
}

/// `vms` setup times of the C floor, in microseconds.
fn c_floor(binary: &std::path::Path, vms: usize) -> Result<Vec<i64>, String> {
    let out = std::process::Command::new(binary)
        .arg(vms.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|us| us.round() as i64)
        .collect())
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
    let measurer = Measurer::open();
    let kvm = measurer.kvm().expect("open /dev/kvm");
    let payload = Payload::embedded().expect("embedded payload");
    let spec = RunSpec {
        iterations: 100,
        warmup: 10,
        timeout: Duration::from_secs(30),
        ..RunSpec::new(Path::HwAssist)
    };
    let supported = kvm
        .kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    let mut setup_us = Vec::with_capacity(vms);
    let mut bare_us = Vec::with_capacity(vms);
    let mut run_us = Vec::with_capacity(vms);
    // The C floor runs in turns with vmm's VMs (ten at a time), so that both see the same
    // host: on a host that is itself a VM, figures drift by half over a minute.
    let c_dir = tempfile::tempdir().expect("a scratch directory");
    let c_binary = build_c_floor(c_dir.path());
    let mut c_us: Result<Vec<i64>, String> = c_binary.clone().map(|_| Vec::with_capacity(vms));
    for i in 0..vms {
        if i % 10 == 0 {
            if let (Ok(binary), Ok(times)) = (&c_binary, &mut c_us) {
                match c_floor(binary, 10.min(vms - i)) {
                    Ok(more) => times.extend(more),
                    Err(why) => c_us = Err(why),
                }
            }
        }
        let m = measurer.measure(&payload, &spec, None).expect("a launch failed");
        setup_us.push(m.setup.map_or(0, |d| d.as_micros() as i64));
        run_us.push(m.run.as_micros() as i64);
        bare_us.push(bare_vm_setup(kvm, &supported, &payload, &spec).as_micros() as i64);
    }
    let setup = stats::summarize(&setup_us).expect("at least one VM");
    let bare = stats::summarize(&bare_us).expect("at least one VM");
    let run = stats::summarize(&run_us).expect("at least one VM");
    let rss_mib = peak_rss_kib().map_or(f64::NAN, |kib| kib as f64 / 1024.0);
    println!(
        "launch benchmark: {vms} VMs in a row, {} iterations each (hw-assist), registers via {:?}",
        spec.iterations, kvm.registers
    );
    println!(
        "  setup_us  median {:>7}  p99 {:>7}  max {:>7}   (vmm: VM creation to first KVM_RUN)",
        setup.median, setup.p99, setup.max
    );
    println!(
        "  bare_us   median {:>7}  p99 {:>7}  max {:>7}   (kvm-ioctls calls only, same memory)",
        bare.median, bare.p99, bare.max
    );
    println!(
        "  ratio     {:.2}x   (vmm over the kvm-ioctls floor)",
        setup.median as f64 / bare.median.max(1) as f64
    );
    match c_us.as_deref().map(stats::summarize) {
        Ok(Some(c)) => {
            println!(
                "  c_us      median {:>7}  p99 {:>7}  max {:>7}   (bare_vm.c: the same calls in C, and the first KVM_RUN)",
                c.median, c.p99, c.max
            );
            println!(
                "  ratio     {:.2}x   (vmm over the C floor; goal: <= 1.3x)",
                setup.median as f64 / c.median.max(1) as f64
            );
        }
        Ok(None) => println!("  c_us      (the C floor printed nothing)"),
        Err(why) => println!("  c_us      not measured: {why}"),
    }
    println!("  run_us    median {:>7}  p99 {:>7}", run.median, run.p99);
    println!("  peak RSS  {rss_mib:.1} MiB   (target: < 30 MiB)");
}
