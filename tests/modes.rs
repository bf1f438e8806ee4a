//! End-to-end tests of the CPUID paths and latency shaping, on this machine's KVM.
//! (What needs a KVM that honours TSC moves is in `nested_svm.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

mod common;

use common::{assert_trap_refused, json_run, path_runs_here, stderr, vm_test, vmm};
use serde_json::Value;
use vmm::arch::x86_64::cpuid::masked;

const TRAP_EMULATE_HW: &[&str] = &["--mode", "trap-emulate", "--trap", "hw-breakpoint"];
const TRAP_EMULATE_INT3: &[&str] = &["--mode", "trap-emulate", "--trap", "int3-patch"];
const TRAP_EMULATE_IO: &[&str] = &["--mode", "trap-emulate", "--trap", "io-patch"];
const PARAVIRT: &[&str] = &["--mode", "paravirt"];

fn run_mode(mode: &[&str], extra: &[&str]) -> Value {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(mode);
    args.extend_from_slice(extra);
    json_run(&args)
}

#[test]
fn every_vmm_handled_mode_reports_one_exit_per_cpuid_sample() {
    let Some(_vm) = vm_test() else { return };
    for (mode, exit) in [
        (TRAP_EMULATE_HW, "cpuid-trap"),
        (TRAP_EMULATE_INT3, "cpuid-trap"),
        (TRAP_EMULATE_IO, "cpuid-trap"),
        (PARAVIRT, "cpuid-hypercall"),
    ] {
        if !path_runs_here(mode) {
            assert_trap_refused(mode);
            continue;
        }
        let report = run_mode(mode, &["--iterations", "300", "--warmup", "20"]);
        // The fenced probe's iterations and warm-up, and the unfenced probe's iterations
        // (it takes no warm-up, as the detectors it reproduces take none).
        assert_eq!(
            report["exits"][exit]["count"],
            300 + 20 + 300,
            "{mode:?}: both CPUID probes, warm-up included"
        );
        assert!(
            report["exits"][exit]["handler_cycles_median"].as_u64().unwrap() > 0,
            "{mode:?}"
        );
        assert_eq!(report["probes"]["cpuid"]["count"], 300);
        let median = |p: &str| report["probes"][p]["median"].as_i64().unwrap();
        assert!(median("cpuid") > median("nop"), "{mode:?}");
    }
}

#[test]
fn the_trap_report_names_the_mechanism_and_its_delivery() {
    let Some(_vm) = vm_test() else { return };
    if path_runs_here(TRAP_EMULATE_HW) {
        let hw = run_mode(TRAP_EMULATE_HW, &["-n", "20"]);
        assert_eq!(hw["trap"]["mechanism"], "hw-breakpoint");
        assert_eq!(hw["trap"]["delivery"], "debug-exit");
    } else {
        assert_trap_refused(TRAP_EMULATE_HW);
    }
    if path_runs_here(TRAP_EMULATE_INT3) {
        let int3 = run_mode(TRAP_EMULATE_INT3, &["-n", "20"]);
        assert_eq!(int3["trap"]["mechanism"], "int3-patch");
        assert!(int3["trap"]["delivery"].is_string());
    } else {
        assert_trap_refused(TRAP_EMULATE_INT3);
    }
    let io = run_mode(TRAP_EMULATE_IO, &["-n", "20"]);
    assert_eq!(io["trap"]["mechanism"], "io-patch");
    assert_eq!(io["trap"]["delivery"], "port-io");
    assert_eq!(io["path"], "trap-emulate:io-patch");
    assert!(run_mode(PARAVIRT, &["-n", "20"])["trap"].is_null());
}

/// Point 3 of the issue: whoever answers, the guest sees the same registers.
#[test]
fn all_four_vm_paths_return_identical_cpuid_registers() {
    let Some(_vm) = vm_test() else { return };
    let snapshot = |mode: &[&str]| -> Vec<(u64, u64, [u32; 4])> {
        let report = run_mode(mode, &["-n", "10", "--warmup", "0"]);
        report["cpuid_snapshot"]
            .as_array()
            .expect("a cpuid_snapshot")
            .iter()
            .map(|r| {
                let leaf = r["leaf"].as_u64().unwrap();
                let regs = ["eax", "ebx", "ecx", "edx"].map(|k| r[k].as_u64().unwrap() as u32);
                (leaf, r["subleaf"].as_u64().unwrap(), masked(leaf as u32, regs))
            })
            .collect()
    };
    let reference = snapshot(&["--mode", "hw-assist"]);
    assert_eq!(reference.len(), guest_payload::CPUID_SNAPSHOT_LEAVES.len());
    assert!(
        reference.iter().any(|(leaf, _, regs)| *leaf == 0 && regs[0] > 0),
        "leaf 0 gives the max leaf"
    );
    for mode in [TRAP_EMULATE_HW, TRAP_EMULATE_INT3, TRAP_EMULATE_IO, PARAVIRT] {
        if !path_runs_here(mode) {
            assert_trap_refused(mode);
            continue;
        }
        assert_eq!(snapshot(mode), reference, "{mode:?} answers differently from KVM");
    }
}

#[test]
fn snapshot_queries_are_counted_apart_from_the_timed_cpuids() {
    let Some(_vm) = vm_test() else { return };
    let extra = guest_payload::CPUID_SNAPSHOT_LEAVES.len() as u64;
    for (mode, timed, query) in [
        (TRAP_EMULATE_HW, "cpuid-trap", "cpuid-query-trap"),
        (TRAP_EMULATE_IO, "cpuid-trap", "cpuid-query-trap"),
        (PARAVIRT, "cpuid-hypercall", "cpuid-query-hypercall"),
    ] {
        if !path_runs_here(mode) {
            assert_trap_refused(mode);
            continue;
        }
        let report = run_mode(mode, &["-n", "50", "--warmup", "5"]);
        assert_eq!(report["exits"][timed]["count"].as_u64(), Some(55 + 50), "{mode:?}");
        assert_eq!(report["exits"][query]["count"].as_u64(), Some(extra), "{mode:?}");
    }
}

#[test]
fn only_the_patching_traps_leave_a_trace_in_the_guests_code() {
    let Some(_vm) = vm_test() else { return };
    let cpuid = serde_json::json!([[0x0f, 0xa2], [0x0f, 0xa2], [0x0f, 0xa2], [0x0f, 0xa2]]);
    for mode in [
        &["--mode", "native"][..],
        &["--mode", "hw-assist"],
        TRAP_EMULATE_HW,
        PARAVIRT,
    ] {
        if !path_runs_here(mode) {
            assert_trap_refused(mode);
            continue;
        }
        assert_eq!(run_mode(mode, &["-n", "10"])["cpuid_site_bytes"], cpuid, "{mode:?}");
    }
    let patched = serde_json::json!([[0xcc, 0x90], [0xcc, 0x90], [0xcc, 0x90], [0xcc, 0x90]]);
    if path_runs_here(TRAP_EMULATE_INT3) {
        assert_eq!(run_mode(TRAP_EMULATE_INT3, &["-n", "10"])["cpuid_site_bytes"], patched);
    } else {
        assert_trap_refused(TRAP_EMULATE_INT3);
    }
    let io = run_mode(TRAP_EMULATE_IO, &["-n", "10"]);
    assert_eq!(
        io["cpuid_site_bytes"],
        serde_json::json!([[0xe6, 0xf7], [0xe6, 0xf7], [0xe6, 0xf7], [0xe6, 0xf7]])
    );
    let integrity = io["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["rule"] == "code-integrity")
        .cloned();
    assert_eq!(integrity.unwrap()["verdict"], "virtual");
}

/// Injecting X raises the CPUID median over the same invocation's un-injected calibration
/// run by X, within 10% plus that run's own spread.
#[test]
fn injected_latency_shows_up_in_the_guest_median() {
    let Some(_vm) = vm_test() else { return };
    for (mode, inject_ns) in [(TRAP_EMULATE_HW, 20_000u64), (PARAVIRT, 60_000)] {
        if !path_runs_here(mode) {
            assert_trap_refused(mode);
            continue;
        }
        let report = run_mode(mode, &["-n", "1000", "--inject-ns", &inject_ns.to_string()]);
        let shaping = &report["shaping"];
        assert_eq!(shaping["kind"], "inject");
        let requested = shaping["requested_ns"].as_f64().unwrap();
        let achieved = shaping["achieved_ns"].as_f64().unwrap();
        let khz = report["host"]["tsc_khz"].as_f64().unwrap();
        let spread_ns = shaping["baseline_spread_cycles"].as_f64().unwrap() * 1e6 / khz;
        assert!((requested - inject_ns as f64).abs() < 1.0, "{requested} vs {inject_ns}");
        assert!(
            (achieved - requested).abs() <= 0.1 * requested + spread_ns,
            "{mode:?}: injected {requested} ns, the median moved by {achieved} ns (spread {spread_ns} ns)"
        );
    }
}

#[test]
fn tsc_shaping_is_refused_where_tsc_moves_are_not_honoured() {
    // Where doctor finds the moves honoured (hardware KVM, nested SVM) nested_svm.rs
    // tests them working.
    let Some(_vm) = vm_test().filter(|_| !common::kvm_moves_tsc()) else {
        return;
    };
    for shaping in [
        &["--hide"][..],
        &["--virtual-inject-cycles", "5000"],
        &["--profile", "vtx-hw-assist"],
    ] {
        let mut args = vec!["run", "--mode", "paravirt", "-n", "20"];
        args.extend_from_slice(shaping);
        let output = vmm(&args);
        assert_eq!(output.status.code(), Some(1), "{shaping:?}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(
            message.contains("TSC moves are not honoured by this KVM"),
            "{shaping:?}: {message}"
        );
    }
}

#[test]
fn shaping_needs_a_mode_whose_exits_the_vmm_handles() {
    for mode in ["hw-assist", "native"] {
        let output = vmm(&["run", "--mode", mode, "--inject-ns", "1000", "-n", "10"]);
        assert_eq!(output.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&output.stderr).contains("use --mode trap-emulate or --mode paravirt"));
    }
    // Shaping without the probe it shapes would calibrate and then report nothing.
    let output = vmm(&["run", "--mode", "paravirt", "--hide", "--probes", "nop", "-n", "10"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("add cpuid to --probes"));
}

#[test]
fn unknown_or_malformed_profiles_are_refused() {
    let output = vmm(&["run", "--mode", "paravirt", "--profile", "warp-speed"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("no profile named `warp-speed`"));
    let path = std::env::temp_dir().join(format!("vmm-test-{}-profile.json", std::process::id()));
    std::fs::write(
        &path,
        r#"{"name":"x","description":"","sources":[],"distribution":{"kind":"normal","mean":-1,"sd":1}}"#,
    )
    .unwrap();
    let output = vmm(&["run", "--mode", "paravirt", "--profile", path.to_str().unwrap()]);
    std::fs::remove_file(&path).ok();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not usable"));
}

/// A report must never name a payload it did not run.
#[test]
fn native_mode_refuses_a_payload_it_cannot_run_natively() {
    let Some(_vm) = vm_test() else { return };
    let path = std::env::temp_dir().join(format!("vmm-test-{}-payload.elf", std::process::id()));
    std::fs::write(&path, vmm::vm::loader::EMBEDDED_PAYLOAD).unwrap();
    let file = path.to_str().unwrap();
    let output = vmm(&["run", "--mode", "native", "--payload", file, "-n", "10"]);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("native twin") && message.contains(".native"),
        "{message}"
    );
    // The same file in a VM runs, and the report names it.
    let report = json_run(&["run", "--mode", "hw-assist", "--payload", file, "-n", "10", "--json"]);
    std::fs::remove_file(&path).ok();
    assert_eq!(report["payload"]["source"], file);
}

/// A payload that faults on its own, right after a trapped CPUID, is reported as faulting,
/// not as a trap KVM failed to deliver.
#[test]
fn a_payload_that_faults_after_a_cpuid_is_not_blamed_on_the_trap() {
    let Some(_vm) = vm_test() else { return };
    use vmm::vm::loader::{test_support::tiny_elf, EM_X86_64};
    // cpuid; ud2 at the entry: the fault is at the instruction after the trapped site.
    let path = std::env::temp_dir().join(format!("vmm-test-{}-cpuid-ud2.elf", std::process::id()));
    let code = [0x0f, 0xa2, 0x0f, 0x0b];
    std::fs::write(&path, tiny_elf(EM_X86_64, guest_payload::layout::PAYLOAD_START, &code)).unwrap();
    for trap in ["hw-breakpoint", "io-patch"]
        .into_iter()
        .filter(|t| common::kvm_delivers(t))
    {
        let output = vmm(&[
            "run",
            "--mode",
            "trap-emulate",
            "--trap",
            trap,
            "--payload",
            path.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(1));
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains("triple-faulted"), "{trap}: {message}");
        assert!(!message.contains("not delivered"), "{trap}: {message}");
    }
    std::fs::remove_file(&path).ok();
}

/// A payload whose only CPUID is never executed: the trap is not blamed on KVM (which the
/// embedded timing core shows delivers it); the run says that its CPUID never trapped.
#[test]
fn a_cpuid_site_that_never_runs_is_not_blamed_on_kvm() {
    let Some(_vm) = vm_test() else { return };
    // The CPUID is behind a condition no config meets: it is in the code, never run.
    let (dir, elf) = common::build_c_payload(
        "never",
        r#"#include "vmm_sdk.h"
VMM_PAYLOAD("never runs its cpuid", 0);
int vmm_detect(struct vmm_run *run) {
    int status = vmm_begin(run, 1u << VMM_PROBE_CPUID, 1);
    if (status != VMM_STATUS_OK)
        return status;
    uint32_t regs[4] = {0, 0, 0, 0};
    if (run->config->iterations == 0xffffffffu)
        vmm_cpuid(run, 0, 0, regs);
    vmm_samples(run, VMM_PROBE_CPUID)[0] = (int64_t)regs[0] + 1;
    return VMM_STATUS_OK;
}
"#,
    );
    for trap in ["hw-breakpoint", "io-patch"]
        .into_iter()
        .filter(|t| common::kvm_delivers(t))
    {
        let output = vmm(&[
            "run",
            "--mode",
            "trap-emulate",
            "--trap",
            trap,
            "--payload",
            elf.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(1), "{trap}");
        let message = stderr(&output);
        assert!(!message.contains("not delivered by this KVM"), "{trap}: {message}");
        assert!(message.contains("never trapped"), "{trap}: {message}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A handler's injected spin is bounded by the run's deadline too: a second per exit for
/// 20,100 exits would spin for hours, out of the watchdog's reach between exits.
#[test]
fn an_injected_spin_stops_at_the_runs_deadline() {
    let Some(_vm) = vm_test() else { return };
    let started = std::time::Instant::now();
    let output = vmm(&[
        "run",
        "--mode",
        "trap-emulate",
        "--trap",
        "io-patch",
        "--inject-ns",
        "1000000000",
        "--timeout",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("did not ring \"done\" within 1s"),
        "{}",
        stderr(&output)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// The exit handler runs on the vCPU thread: what it can do is what a guest that broke
/// the exit path could do. KVM's ioctls still work there; a file or a socket does not.
#[test]
fn the_vcpu_thread_runs_under_a_seccomp_filter_that_refuses_files_and_sockets() {
    use vmm::measure::{Measurer, RunSpec};
    use vmm::modes::{hw_assist::HwAssist, ExitPath, ModeError, Path};
    use vmm::shaping::Policies;
    use vmm::vm::exit::Exit;
    use vmm::vm::handler::{ExitHandler, Flow};
    use vmm::vm::vcpu::Vcpu;

    struct TriesForbiddenCalls {
        inner: HwAssist,
        open: Option<std::io::Result<std::fs::File>>,
        socket: Option<std::io::Result<std::os::unix::net::UnixStream>>,
        regs_readable: bool,
    }
    impl ExitHandler for TriesForbiddenCalls {
        type Error = ModeError;
        fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ModeError> {
            ExitPath {
                answerer: &mut self.inner,
                policy: &mut Policies::none(),
                tsc_trap: None,
                console: None,
            }
            .arm(vcpu)
        }
        fn handle(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, tsc: u64) -> Result<Flow, ModeError> {
            if self.open.is_none() {
                self.open = Some(std::fs::File::open("/proc/self/status"));
                self.socket = Some(std::os::unix::net::UnixStream::connect("/nonexistent"));
                self.regs_readable = vcpu.regs().is_ok();
            }
            ExitPath {
                answerer: &mut self.inner,
                policy: &mut Policies::none(),
                tsc_trap: None,
                console: None,
            }
            .handle(vcpu, exit, tsc)
        }
    }

    let Some(_vm) = vm_test() else { return };
    let measurer = Measurer::open();
    let payload = vmm::vm::loader::Payload::embedded().unwrap();
    let config = RunSpec::new(Path::HwAssist)
        .cpuid_only(20, 0, vmm::shaping::latency::Shaping::None)
        .guest_config();
    let mut vm = vmm::vm::GuestVm::create(measurer.kvm().unwrap(), &payload, &config, Default::default()).unwrap();
    let mut handler = TriesForbiddenCalls {
        inner: HwAssist,
        open: None,
        socket: None,
        regs_readable: false,
    };
    vm.run(&mut handler, std::time::Duration::from_secs(30))
        .expect("the run itself is allowed");
    const EPERM: i32 = 1;
    let denied = |e: &std::io::Error| e.raw_os_error() == Some(EPERM);
    assert!(matches!(&handler.open, Some(Err(e)) if denied(e)), "{:?}", handler.open);
    assert!(
        matches!(&handler.socket, Some(Err(e)) if denied(e)),
        "{:?}",
        handler.socket
    );
    assert!(handler.regs_readable, "KVM's own ioctls must stay allowed");
    // This thread (the caller's) is not sandboxed: the filter is per vCPU thread.
    assert!(std::fs::File::open("/proc/self/status").is_ok());
}
