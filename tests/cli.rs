//! End-to-end tests: the built `vmm` binary driven as a user would drive it.
//!
//! These boot real VMs. Where /dev/kvm is absent they skip, loudly; in CI (CI=true) a
//! missing /dev/kvm is a failure, never a skip.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

use guest_payload::layout::PAYLOAD_START;
mod common;

use common::{json_run, stderr, timing_lock, vm_test, vmm};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmm::vm::loader::test_support::tiny_elf;
use vmm::vm::loader::EM_X86_64;

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()))
}

#[test]
fn hw_assist_run_reports_every_field_and_cpuid_costs_more_than_nop() {
    let Some(_vm) = vm_test() else { return };
    let report = json_run(&[
        "run",
        "--mode",
        "hw-assist",
        "--iterations",
        "500",
        "--warmup",
        "20",
        "--json",
    ]);
    assert_eq!(report["schema_version"], vmm::report::SCHEMA_VERSION);
    assert!(
        report["host"]["kernel"].is_string(),
        "each run names the kernel it ran on"
    );
    assert_eq!(report["mode"], "hw-assist");
    assert_eq!(report["path"], "hw-assist");
    assert!(report["register_access"].is_string());
    assert!(report["host"]["tsc_khz"].as_u64().unwrap() > 0);
    assert!(report["host"]["kvm"]["flavour"].is_string());
    assert_eq!(report["config"]["iterations"], 500);
    for probe in ["cpuid", "nop", "rdtsc"] {
        let stats = &report["probes"][probe];
        assert_eq!(stats["count"], 500, "{probe}");
        assert_eq!(stats["backwards"], 0, "{probe}: hw-assist moves no TSC");
        assert_eq!(stats["max_backwards_cycles"], 0, "{probe}");
        for field in ["min", "p5", "median", "mean", "p95", "p99", "max"] {
            assert!(stats[field].is_number(), "{probe}.{field}");
            assert!(stats["ns"][field].is_number(), "{probe}.ns.{field}");
        }
        assert!(stats["min"].as_i64() <= stats["median"].as_i64() && stats["median"].as_i64() <= stats["max"].as_i64());
    }
    // The fastest samples: what interference (a loaded host) cannot push down.
    let fastest = |p: &str| report["probes"][p]["min"].as_i64().unwrap();
    assert!(
        fastest("cpuid") > fastest("nop"),
        "CPUID {} vs NOP {}",
        fastest("cpuid"),
        fastest("nop")
    );
    assert_eq!(report["exits"]["done-io"]["count"], 1);
    assert!(report["exits"]["console-io"]["count"].as_u64().unwrap() > 0);
    assert!(report["timings"]["setup_us"].as_u64().unwrap() > 0);
    assert!(report["timings"]["run_us"].as_u64().unwrap() > 0);
    assert!(
        report["payload"]["cpuid_sites"]["vmm_site_cpuid_probe"]
            .as_u64()
            .unwrap()
            >= PAYLOAD_START
    );
}

#[test]
fn native_run_measures_the_same_probes_on_a_pinned_cpu() {
    let _timing = timing_lock();
    let report = json_run(&["run", "--mode", "native", "--iterations", "2000", "--json"]);
    assert_eq!(report["mode"], "native");
    assert_eq!(report["probes"]["cpuid"]["count"], 2000);
    assert!(report["native_cpu"].is_number());
    assert!(report["timings"]["setup_us"].is_null());
    let median = |p: &str| report["probes"][p]["median"].as_u64().unwrap();
    assert!(median("cpuid") > median("nop"));
}

#[test]
fn table_output_shows_each_probe_and_the_excess() {
    let Some(_vm) = vm_test() else { return };
    let output = vmm(&["run", "--iterations", "200"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    for expected in ["cpuid", "nop", "rdtsc", "median", "CPUID over NOP", "done-io", "setup"] {
        assert!(table.contains(expected), "no `{expected}` in:\n{table}");
    }
}

#[test]
fn raw_samples_go_to_csv_and_json() {
    let Some(_vm) = vm_test() else { return };
    let csv = temp_path("samples.csv");
    let report = json_run(&[
        "run",
        "-n",
        "50",
        "--probes",
        "cpuid,nop",
        "--json",
        "--raw",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(report["samples"]["cpuid"].as_array().unwrap().len(), 50);
    assert!(report["probes"]["rdtsc"].is_null(), "rdtsc was not asked for");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::remove_file(&csv).ok();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("probe,index,cycles"));
    assert_eq!(lines.clone().filter(|l| l.starts_with("cpuid,")).count(), 50);
    assert_eq!(lines.filter(|l| l.starts_with("nop,")).count(), 50);
}

#[test]
fn console_output_is_shown_on_request() {
    let Some(_vm) = vm_test() else { return };
    let output = vmm(&["run", "-n", "10", "--console"]);
    assert!(output.status.success());
    assert!(stderr(&output).contains("guest: measuring"), "{}", stderr(&output));
}

#[test]
fn watchdog_stops_a_hanging_guest_soon_after_the_deadline() {
    let Some(_vm) = vm_test() else { return };
    let started = Instant::now();
    let output = vmm(&["run", "--misbehave", "hang", "--timeout", "1"]);
    let elapsed = started.elapsed();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("the guest hung"), "{}", stderr(&output));
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?} for a 1 s timeout");
}

#[test]
fn a_faulting_guest_is_reported_with_its_rip() {
    let Some(_vm) = vm_test() else { return };
    let output = vmm(&["run", "--misbehave", "fault"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("triple-faulted at RIP 0x"), "{message}");
}

#[test]
fn stray_mmio_and_port_io_are_refused_where_the_guest_did_them() {
    let Some(_vm) = vm_test() else { return };
    for (what, expected) in [
        ("mmio", "accessed MMIO address 0x30000000 at RIP 0x"),
        ("port", "did an OUT on port 0x70 at RIP 0x"),
    ] {
        let output = vmm(&["run", "--misbehave", what]);
        assert_eq!(output.status.code(), Some(1), "{what}: {}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{what}: {}", stderr(&output));
    }
}

#[test]
fn misbehave_refuses_a_payload_of_ones_own() {
    let output = vmm(&["run", "--misbehave", "hang", "--payload", "any.elf"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot be used with"), "{}", stderr(&output));
}

#[test]
fn bad_payloads_are_refused_with_one_clear_line() {
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("text", b"not an elf at all\n".to_vec(), "not an ELF file"),
        ("empty", Vec::new(), "not an ELF file"),
        ("aarch64", tiny_elf(183, PAYLOAD_START, &[0; 4]), "built for AArch64"),
        (
            "low-segment",
            tiny_elf(EM_X86_64, 0x1000, &[0xf4]),
            "outside the payload window",
        ),
        (
            "huge-segment",
            tiny_elf(EM_X86_64, 0x3f_ffff, &[0xf4; 8]),
            "outside the payload window",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = temp_path(name);
        std::fs::write(&path, bytes).unwrap();
        let output = vmm(&["run", "--payload", path.to_str().unwrap()]);
        std::fs::remove_file(&path).ok();
        assert_eq!(output.status.code(), Some(1), "{name}");
        let message = stderr(&output);
        assert!(message.contains(expected), "{name}: {message}");
        assert_eq!(message.trim().lines().count(), 1, "{name}: one line, got {message}");
        assert!(!message.contains("panicked"), "{name}: {message}");
    }
    let output = vmm(&["run", "--payload", "/nonexistent/payload.elf"]);
    assert!(stderr(&output).contains("cannot read the payload"));
}

#[test]
fn a_payload_that_never_rings_done_is_stopped() {
    let Some(_vm) = vm_test() else { return };
    // `jmp .` at the entry: a valid ELF that ignores the ABI and spins.
    let path = temp_path("spin");
    std::fs::write(&path, tiny_elf(EM_X86_64, PAYLOAD_START, &[0xeb, 0xfe])).unwrap();
    let output = vmm(&["run", "--payload", path.to_str().unwrap(), "--timeout", "0.5"]);
    std::fs::remove_file(&path).ok();
    assert!(stderr(&output).contains("the guest hung"), "{}", stderr(&output));
}

#[test]
fn bad_numbers_and_modes_are_usage_errors() {
    for args in [
        &["run", "--iterations", "0"][..],
        &["run", "--iterations", "4000000000"],
        &["run", "--mode", "warp-drive"],
        &["run", "--leaf", "banana"],
        &["run", "--timeout", "-3"],
    ] {
        let output = vmm(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains("error:"), "{args:?}");
    }
}

/// Every rule a run can be judged by can be required, the counter and XOR rules included;
/// an unknown one is refused. Requirements are read before anything runs: the bad shard
/// after them stops `validate` before a VM is booted.
#[test]
fn every_rule_is_requirable_and_an_unknown_one_is_refused_before_any_run() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/validation.json");
    let validate = |require: &[&str]| {
        let mut args = vec!["validate", "--config", config, "--shard", "0/2"];
        for r in require {
            args.extend(["--require", r]);
        }
        vmm(&args)
    };
    let output = validate(&["vmaware-timer-2.7:tpr>=0", "counter-tsc:tpr>=0", "xor-rate:fpr<=1"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("--shard") && !message.contains("--require"),
        "the requirements are accepted, the shard is not: {message}"
    );
    let output = validate(&["nope:tpr>=0"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("--require `nope:tpr>=0`: unknown rule `nope`") && message.contains("cross-vcpu-tsc"),
        "{message}"
    );
}

#[test]
fn an_unwritable_csv_path_is_refused_before_measuring() {
    let output = vmm(&["run", "--mode", "native", "--csv", "/nonexistent-dir/x.csv"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cannot write /nonexistent-dir/x.csv"));
}

#[test]
fn doctor_reports_each_check_and_boots_a_guest() {
    let Some(_vm) = vm_test() else { return };
    let output = vmm(&["doctor", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let checks: Value = serde_json::from_slice(&output.stdout).unwrap();
    let names: Vec<&str> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in [
        "/dev/kvm",
        "KVM API version",
        "KVM flavour",
        "host is a VM",
        "invariant TSC",
        "TSC frequency",
        "guest boot",
        "sandbox",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let sandbox = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sandbox")
        .unwrap();
    assert_eq!(sandbox["verdict"], "ok", "{sandbox}");
}

/// A calibration says where it came from: another host's is used with a loud warning, and
/// a file whose figures are not numbers, or whose spreads are negative, is refused.
#[test]
fn calibrations_are_checked_for_their_host_and_their_values() {
    let Some(_vm) = common::vm_test() else { return };
    let path = std::env::temp_dir().join(format!("vmm-cli-{}-calibration.json", std::process::id()));
    let file = path.to_str().unwrap();
    let output = vmm(&["calibrate", "--runs", "2", "-n", "20", "--native-only", "-o", file]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let calibration: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        calibration["host"]["kernel"].is_string(),
        "it records the kernel it ran on"
    );
    // The same host: no warning.
    let output = vmm(&["run", "--mode", "native", "-n", "50", "--calibration", file]);
    assert!(output.status.success());
    assert!(
        !common::stderr(&output).contains("WARNING"),
        "{}",
        common::stderr(&output)
    );
    // Another host's: a warning that names the difference, and the run still runs.
    let mut other = calibration.clone();
    other["host"]["cpu_model"] = "Intel(R) Core(TM) i9-13900K".into();
    std::fs::write(&path, other.to_string()).unwrap();
    let output = vmm(&["run", "--mode", "native", "-n", "50", "--calibration", file]);
    assert!(output.status.success());
    let message = common::stderr(&output);
    assert!(
        message.contains("WARNING") && message.contains("i9-13900K"),
        "{message}"
    );
    // Negative spreads and non-numbers are refused.
    for (key, value) in [
        ("sd", serde_json::json!(-1.0)),
        ("mean", serde_json::json!(1e308 * 10.0)),
    ] {
        let mut bad = calibration.clone();
        bad["robust_excess_p10_ns"][key] = value;
        let text = bad.to_string().replace("null", "1e999");
        std::fs::write(&path, text).unwrap();
        let output = vmm(&["run", "--mode", "native", "-n", "50", "--calibration", file]);
        assert_eq!(output.status.code(), Some(1), "{key}");
        let message = common::stderr(&output);
        assert!(
            message.contains("robust_excess_p10_ns") || message.contains("not valid"),
            "{key}: {message}"
        );
    }
    std::fs::remove_file(&path).ok();
}

/// A full or closed stdout is an error with a message, not a panic (exit 101).
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let Some(_vm) = common::vm_test() else { return };
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--mode", "native", "-n", "100"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = common::stderr(&output);
    assert!(
        message.contains("cannot write to stdout") && !message.contains("panicked"),
        "{message}"
    );
}

/// Input files that are not regular files are refused before anything reads them whole.
#[test]
fn devices_are_refused_as_inputs() {
    for args in [
        &["run", "--payload", "/dev/urandom"][..],
        &["inspect", "/dev/zero"],
        &["validate", "--config", "/dev/urandom"],
        &["run", "--calibration", "/dev/zero"],
    ] {
        let output = vmm(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            common::stderr(&output).contains("not a regular file"),
            "{args:?}: {}",
            common::stderr(&output)
        );
    }
}

/// The native runner is held to --timeout as a guest is: ten million samples per probe on a
/// host whose CPUID is itself an exit do not fit in a second.
#[test]
fn a_native_run_stops_at_its_deadline() {
    let Some(_vm) = common::vm_test() else { return };
    let started = std::time::Instant::now();
    let output = vmm(&["run", "--mode", "native", "-n", "10000000", "--timeout", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        common::stderr(&output).contains("passed its deadline (1s)"),
        "{}",
        common::stderr(&output)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// A refusal is worded where the run was asked for: `vmm run` names the flag that would
/// let it run, `vmm validate` the matrix field (a flag means nothing in a JSON matrix).
#[test]
fn a_refusal_names_the_flag_on_the_command_line_and_the_field_in_a_matrix() {
    let output = vmm(&["run", "--mode", "paravirt", "--evade", "pause-counter"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("has none: add --vcpus 2"),
        "{}",
        stderr(&output)
    );

    let dir = tempfile::tempdir().unwrap();
    let matrix = dir.path().join("matrix.json");
    std::fs::write(
        &matrix,
        r#"{"description":"wording","repeats":1,"iterations":10,"modes":["paravirt"],"evasions":["pause-counter"]}"#,
    )
    .unwrap();
    let report = json_run(&["validate", "--config", matrix.to_str().unwrap(), "--json"]);
    let why = report["refusals"][0]["why"].as_str().unwrap().to_owned();
    assert!(why.contains("set \"vcpus\": 2 in the matrix"), "{why}");
    assert!(!why.contains("--"), "no flag in a matrix's refusal: {why}");
}

#[test]
fn run_and_trace_default_to_the_same_trap() {
    let default_trap = |command: &str| {
        let help = String::from_utf8_lossy(&vmm(&[command, "--help"]).stdout).into_owned();
        let at = help
            .find("--trap <TRAP>")
            .unwrap_or_else(|| panic!("{command}: no --trap"));
        let rest = &help[at..];
        let default = rest.find("[default: ").expect("a default");
        rest[default..].lines().next().unwrap().to_owned()
    };
    assert_eq!(default_trap("run"), default_trap("trace"));
}
