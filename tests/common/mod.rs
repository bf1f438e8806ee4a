//! Helpers shared by the end-to-end tests: run the built `vmm` binary as a user would.
#![allow(dead_code)] // each test binary uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a failed test

use serde_json::Value;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Tests whose assertions compare timings take this, and so do tests that load the machine
/// (--busy, long matrices), so that nothing loads it while a timing test measures (the test
/// harness runs a binary's tests in parallel).
pub fn timing_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run the vmm binary")
}

/// These tests boot real VMs. Where /dev/kvm is absent they skip, loudly; in CI
/// (CI=true) a missing /dev/kvm is a failure, never a skip.
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must have /dev/kvm: these tests boot real VMs"
    );
    eprintln!("\n*** SKIPPED: /dev/kvm is absent on this machine; this test boots a real VM ***\n");
    false
}

/// For a test that boots VMs: `None` (a loud skip) without /dev/kvm, else the timing lock
/// held for the test's length — a VM burns a CPU, and timing tests must not share one.
pub fn vm_test() -> Option<MutexGuard<'static, ()>> {
    kvm_available().then(timing_lock)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `vmm ARGS` (which must include --json), expects success, parses the report.
pub fn json_run(args: &[&str]) -> Value {
    let output = vmm(args);
    assert!(output.status.success(), "vmm {args:?} failed: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("--json prints one JSON document")
}

/// [`json_run`] for a two-vCPU run on a KVM that may fault the counter vCPU itself
/// (QEMU's emulated nested SVM, now and then): up to three tries where the VMM says the
/// KVM below did it (its code and IDT intact), loudly; any other failure fails at once.
pub fn json_run_past_kvm_faults(args: &[&str]) -> Value {
    for _ in 1..3 {
        let output = vmm(args);
        if !output.status.success() && stderr(&output).contains(vmm::vm::counter::KVM_FAULTED) {
            eprintln!(
                "\n*** the KVM faulted the counter vCPU: {}; running it again ***\n",
                stderr(&output)
            );
            continue;
        }
        assert!(output.status.success(), "vmm {args:?} failed: {}", stderr(&output));
        return serde_json::from_slice(&output.stdout).expect("--json prints one JSON document");
    }
    json_run(args)
}

/// Builds an SDK example with make, as a stock Linux box would, and returns the path of
/// its guest ELF (its native twin sits beside it).
pub fn build_example(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-payload/examples")
        .join(name);
    make(&dir);
    dir.join(format!("{name}.elf"))
}

/// Runs `make` in `dir` (an SDK project), expecting success.
pub fn make(dir: &std::path::Path) {
    let output = Command::new("make")
        .arg("-C")
        .arg(dir)
        .output()
        .expect("make (installed by .ci/run with gcc)");
    assert!(
        output.status.success(),
        "make in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The verdict of `rule` in a run's JSON report.
pub fn verdict_of<'a>(report: &'a Value, rule: &str) -> &'a Value {
    report["verdicts"]
        .as_array()
        .and_then(|verdicts| verdicts.iter().find(|v| v["rule"] == rule))
        .unwrap_or_else(|| panic!("no {rule} verdict in {report}"))
}

/// What `vmm doctor` found about this KVM, by check name: (verdict, detail). Tests ask
/// it before asserting what a KVM can or cannot do, so that they hold on this machine's
/// software KVM, on nested SVM and on hardware alike, from the very probes users see.
pub fn kvm_check(name: &str) -> (String, String) {
    static DOCTOR: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    let checks = DOCTOR.get_or_init(|| {
        let output = vmm(&["doctor", "--json"]);
        let parsed: Value = serde_json::from_slice(&output.stdout).expect("doctor --json prints JSON");
        parsed.as_array().cloned().unwrap_or_default()
    });
    let check = checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("doctor has no check named {name:?}"));
    (
        check["verdict"].as_str().unwrap_or_default().to_owned(),
        check["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Does this KVM honour TSC moves (hide, virtual inject, profiles)? doctor's probe.
pub fn kvm_moves_tsc() -> bool {
    kvm_check("TSC offset writes").0 == "ok"
}

/// Does this KVM offer TSC scaling (`--evade tsc-khz`)? doctor's "TSC scaling" line.
pub fn kvm_scales_tsc() -> bool {
    kvm_check("TSC scaling").0 == "ok"
}

/// Does this KVM deliver `--trap NAME` to the VMM? doctor's probe (`trap NAME`).
pub fn kvm_delivers(trap: &str) -> bool {
    kvm_check(&format!("trap {trap}")).0 == "ok"
}

/// Where `args` name a trap-emulate path (`--trap NAME`), whether this KVM delivers it;
/// every other path is delivered.
pub fn path_runs_here(args: &[&str]) -> bool {
    match args.iter().position(|a| *a == "--trap") {
        Some(i) => args.get(i + 1).is_none_or(|trap| kvm_delivers(trap)),
        None => true,
    }
}

/// Asserts that `vmm run` on a trap path this KVM does not deliver is refused, naming it.
pub fn assert_trap_refused(args: &[&str]) {
    let output = vmm(&[&["run", "-n", "10"][..], args].concat());
    assert_eq!(output.status.code(), Some(1), "{args:?}");
    assert!(
        stderr(&output).contains("traps are not delivered by this KVM"),
        "{args:?}: {}",
        stderr(&output)
    );
}

/// Can `--vcpus 2` run here (a second CPU for the counter)? doctor's "two vCPUs".
pub fn kvm_runs_two_vcpus() -> bool {
    kvm_check("two vCPUs").0 == "ok"
}

/// For a test that needs `--vcpus 2`: [`vm_test`], and where this host has one CPU for
/// this process (nested SVM with SMP=1), the refusal asserted by name and `None`.
pub fn two_vcpus_test() -> Option<MutexGuard<'static, ()>> {
    let guard = vm_test()?;
    if kvm_runs_two_vcpus() {
        return Some(guard);
    }
    let output = vmm(&["run", "--vcpus", "2", "-n", "10"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("needs a second CPU"), "{}", stderr(&output));
    eprintln!("\n*** one CPU for this process: --vcpus 2 is refused (asserted); the rest of this test needs two ***\n");
    None
}

/// Builds a one-file C payload with the SDK, as a detector author would, in a scratch
/// directory of its own (removed by the caller): returns (the directory, the guest ELF).
pub fn build_c_payload(name: &str, source: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.c")), source).unwrap();
    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-payload/sdk/sdk.mk")
        .canonicalize()
        .unwrap();
    std::fs::write(
        dir.join("Makefile"),
        format!("NAME := {name}\nSRCS := {name}.c\ninclude {}\n", sdk.display()),
    )
    .unwrap();
    make(&dir);
    let elf = dir.join(format!("{name}.elf"));
    (dir, elf)
}

/// How many rules judge a run of the default probes without a counter that reads clocks
/// (every VM run of the timing core, and a native one): counted from the registry, so a
/// rule added there is expected here too.
pub fn rules_of_a_default_run() -> usize {
    use vmm::detector::Applies;
    let probes = vmm::measure::default_probes(false);
    let rules = vmm::detector::RULES
        .iter()
        .filter(|r| match r.applies {
            Applies::EveryRun | Applies::UnlessPatchedForAnEvader | Applies::WithClocks => true,
            Applies::WithProbe(probe) => probes & probe.bit() != 0,
            Applies::WithCounter | Applies::WithPayloadVerdict => false,
        })
        .count();
    assert!(rules >= 12, "the registry lost rules: {rules}");
    rules
}
