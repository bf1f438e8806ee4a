//! The guest SDK end to end: C payloads built with `make` as a stock Linux box would, run
//! on every path, their CPUID sites found by decoding (they have no vmm_site_* symbols),
//! their native twins run by `--mode native`, their own verdicts reported by `run`,
//! `compare` and `validate` beside the built-in rules.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

mod common;

use common::{build_example, json_run, stderr, verdict_of, vm_test, vmm};

/// Every path, as `run` spells it.
const PATHS: [&[&str]; 6] = [
    &["--mode", "native"],
    &["--mode", "hw-assist"],
    &["--mode", "trap-emulate", "--trap", "hw-breakpoint"],
    &["--mode", "trap-emulate", "--trap", "int3-patch"],
    &["--mode", "trap-emulate", "--trap", "io-patch"],
    &["--mode", "paravirt"],
];

fn run_payload(payload: &str, path: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "--payload", payload, "--json"];
    args.extend_from_slice(path);
    vmm(&args)
}

#[test]
fn a_c_payload_with_five_cpuids_and_no_symbols_is_trapped_at_every_site() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("five-cpuids");
    let payload = elf.to_str().unwrap();
    for trap in ["int3-patch", "io-patch"]
        .into_iter()
        .filter(|t| common::kvm_delivers(t))
    {
        let report = json_run(&[
            "run",
            "--mode",
            "trap-emulate",
            "--trap",
            trap,
            "--payload",
            payload,
            "--json",
        ]);
        assert_eq!(
            report["exits"]["cpuid-trap"]["count"], 5,
            "{trap}: all five sites trapped"
        );
        assert_eq!(report["probes"]["cpuid"]["count"], 5, "{trap}");
    }
    let output = vmm(&[
        "run",
        "--mode",
        "trap-emulate",
        "--trap",
        "hw-breakpoint",
        "--payload",
        payload,
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("5 CPUID sites"), "{}", stderr(&output));
    // It declares no paravirt support: refused before it runs, by name.
    let output = vmm(&["run", "--mode", "paravirt", "--payload", payload]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("five cpuids"), "{}", stderr(&output));
    // hw-assist runs it; native runs its twin, built from the same source.
    for mode in ["hw-assist", "native"] {
        let report = json_run(&["run", "--mode", mode, "--payload", payload, "--json"]);
        assert_eq!(report["probes"]["cpuid"]["count"], 5, "{mode}");
        assert_eq!(report["payload"]["source"], payload, "{mode}");
    }
}

/// `inspect` reads the file and boots nothing: the same five sites, and what each path
/// would do, with the same refusals a run gives.
#[test]
fn inspect_lists_the_sites_and_what_each_path_would_do() {
    let elf = build_example("five-cpuids");
    let output = vmm(&["inspect", elf.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["cpuid_sites"].as_array().map(Vec::len), Some(5));
    assert_eq!(report["declaration"]["name"], "five cpuids");
    let plan = |path: &str| {
        report["paths"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["path"] == path)
            .cloned()
            .unwrap_or_else(|| panic!("no {path} in {report}"))
    };
    assert_eq!(plan("trap-emulate:hw-breakpoint")["runs"], false);
    assert!(plan("trap-emulate:hw-breakpoint")["what"]
        .as_str()
        .unwrap()
        .contains("5 CPUID sites"));
    assert_eq!(plan("trap-emulate:io-patch")["runs"], true);
    assert_eq!(plan("paravirt")["runs"], false, "it does not declare paravirt CPUID");
    assert!(plan("native")["what"].as_str().unwrap().contains("five-cpuids.native"));
    let text = vmm(&["inspect", elf.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CPUID sites found by decoding the executable segments: 5"),
        "{text}"
    );
    // Not an ELF: the loader's own message, exit 1.
    let output = vmm(&["inspect", "Cargo.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("not an ELF"), "{}", stderr(&output));
}

/// pafish's and al-khaser's CPUID check (one source, `mean_of_ten.c`): the payload's own
/// verdict on every path, natively through its twin, measured as they measure (ten
/// unfenced samples), and the built-in fixed-threshold rule, which follows the same
/// formula on the timing core's unfenced probe, agrees with it wherever both ran.
#[test]
fn the_mean_of_ten_cpuid_checks_report_their_verdict_on_every_path() {
    let Some(_vm) = vm_test() else { return };
    for (example, name) in [
        ("pafish-rdtsc-vmexit", "pafish rdtsc_force_vmexit 0.6"),
        ("al-khaser-rdtsc-diff-vmexit", "al-khaser rdtsc_diff_vmexit 1.0"),
    ] {
        let elf = build_example(example);
        let payload = elf.to_str().unwrap();
        for path in PATHS {
            if !common::path_runs_here(path) {
                common::assert_trap_refused(path);
                continue;
            }
            let output = run_payload(payload, path);
            assert!(output.status.success(), "{example} {path:?}: {}", stderr(&output));
            let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(report["payload"]["declared_name"], name);
            let verdict = verdict_of(&report, "payload");
            let why = verdict["why"].as_str().unwrap();
            assert!(why.contains("rdtsc;cpuid(0);rdtsc mean of 10 = "), "{path:?}: {why}");
            assert!(["virtual", "native"].contains(&verdict["verdict"].as_str().unwrap()));
            assert_eq!(report["probes"]["cpuid-unfenced"]["count"], 10, "{path:?}");
            // The payload's score is its mean in thousands; the rule reads the same samples.
            assert_eq!(
                verdict_of(&report, "fixed-threshold")["verdict"],
                verdict["verdict"],
                "{example} {path:?}: the built-in rule and the original's formula disagree"
            );
        }
    }
}

/// pafish's `rdtsc; rdtsc` check times no CPUID: it runs natively and in hw-assist, and the
/// paths that need a CPUID to reach the VMM refuse it, saying why.
#[test]
fn the_pafish_rdtsc_check_runs_where_it_means_something_and_is_refused_elsewhere() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("pafish-rdtsc");
    let payload = elf.to_str().unwrap();
    for path in &PATHS[..2] {
        let report = json_run(&[&["run", "--payload", payload, "--json"][..], path].concat());
        let why = verdict_of(&report, "payload")["why"].as_str().unwrap().to_owned();
        assert!(
            why.contains("rdtsc;rdtsc mean of 10 = ") && why.contains("750"),
            "{why}"
        );
        assert_eq!(report["probes"]["rdtsc"]["count"], 10);
    }
    for (path, reason) in [
        (PATHS[2], "holds no CPUID instruction"),
        (PATHS[4], "holds no CPUID instruction"),
        (PATHS[5], "does not declare paravirtual CPUID"),
    ] {
        let output = run_payload(payload, path);
        assert_eq!(output.status.code(), Some(1), "{path:?}");
        assert!(stderr(&output).contains(reason), "{path:?}: {}", stderr(&output));
    }
}

/// VMAware v2.6.0's TIMER executes rdtscp and declares it, after checking CPUID for it.
/// Where this KVM runs rdtscp in a guest (hardware KVM, nested SVM) it reports its timing
/// verdict; where the guest's CPUID does not advertise RDTSCP (this machine's emulating
/// KVM) it runs all the same and answers as VMAware does, "VM: RDTSCP not supported";
/// only a KVM that advertises it and then fails on it refuses the run, naming rdtscp.
/// Its native twin runs either way.
#[test]
fn vmaware_timer_2_6_runs_natively_and_in_a_guest_answers_what_its_cpuid_says() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("vmaware-timer-2.6");
    let payload = elf.to_str().unwrap();
    let native = json_run(&["run", "--mode", "native", "--payload", payload, "--json"]);
    let why = verdict_of(&native, "payload")["why"].as_str().unwrap().to_owned();
    assert!(why.contains("TIMER 2.6.0"), "{why}");
    assert_eq!(native["probes"]["cpuid"]["count"], 1000);

    let doctor = vmm(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let rdtscp = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rdtscp in a guest")
        .expect("doctor probes rdtscp in a guest");
    let detail = rdtscp["detail"].as_str().unwrap_or_default().to_owned();
    let advertised = !detail.contains("does not advertise");
    for path in &PATHS[1..] {
        if !common::path_runs_here(path) {
            common::assert_trap_refused(path);
            continue;
        }
        let output = run_payload(payload, path);
        if rdtscp["verdict"] == "ok" || !advertised {
            assert!(output.status.success(), "{path:?}: {}", stderr(&output));
        } else {
            assert_eq!(output.status.code(), Some(1), "{path:?}");
            let message = stderr(&output);
            assert!(message.contains("cannot run rdtscp in a guest"), "{path:?}: {message}");
            continue;
        }
        if !advertised {
            let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            let verdict = verdict_of(&report, "payload");
            assert_eq!(verdict["verdict"], "virtual", "{path:?}: {verdict}");
            let why = verdict["why"].as_str().unwrap();
            assert!(why.contains("RDTSCP not supported"), "{path:?}: {why}");
        }
    }
}

/// A payload that executes rdtscp without declaring it meets the emulating KVM's failure
/// mid-run: the error names the instruction, decoded from guest memory.
#[test]
fn an_instruction_kvm_cannot_run_is_named_in_the_error() {
    let Some(_vm) = vm_test() else { return };
    use vmm::vm::loader::{test_support::tiny_elf, EM_X86_64};
    let doctor = String::from_utf8_lossy(&vmm(&["doctor"]).stdout).into_owned();
    if !doctor.contains("[warn] rdtscp in a guest") {
        eprintln!("this KVM runs rdtscp in a guest: there is no emulation failure to name");
        return;
    }
    // rdtscp; hlt
    let path = std::env::temp_dir().join(format!("vmm-test-{}-rdtscp.elf", std::process::id()));
    let code = [0x0f, 0x01, 0xf9, 0xf4];
    std::fs::write(&path, tiny_elf(EM_X86_64, guest_payload::layout::PAYLOAD_START, &code)).unwrap();
    let output = vmm(&["run", "--mode", "hw-assist", "--payload", path.to_str().unwrap()]);
    std::fs::remove_file(&path).ok();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("at RIP 0x100000, rdtscp (0f 01 f9)"),
        "{}",
        stderr(&output)
    );
}

/// The payload's verdict is a column of `compare` and a rule of `validate`'s confusion
/// matrix, counted over every run of every cell it ran in.
#[test]
fn the_payload_verdict_is_scored_by_compare_and_validate() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("pafish-rdtsc-vmexit");
    let payload = elf.to_str().unwrap();

    let compare = json_run(&["compare", "--payload", payload, "-n", "10", "--json"]);
    for run in compare["runs"].as_array().unwrap() {
        assert_eq!(verdict_of(run, "payload")["rule"], "payload");
        assert_eq!(run["payload"]["source"], payload);
    }
    let table = vmm(&["compare", "--payload", payload, "-n", "10"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("\npayload "));

    let config = std::env::temp_dir().join(format!("vmm-test-{}-payload-matrix.json", std::process::id()));
    std::fs::write(
        &config,
        r#"{"description": "a payload on every path", "repeats": 2, "iterations": 10, "warmup": 0,
            "modes": ["native", "hw-assist", "trap-emulate:hw-breakpoint", "trap-emulate:int3-patch", "trap-emulate:io-patch", "paravirt"]}"#,
    )
    .unwrap();
    // Every shipped detector: its verdict is a rule of the confusion matrix, counted once
    // per run, and the paths it cannot take are refused cells (with the reason), not errors.
    for (example, name, cells_run) in [
        ("pafish-rdtsc-vmexit", "pafish rdtsc_force_vmexit 0.6", 6),
        ("al-khaser-rdtsc-diff-vmexit", "al-khaser rdtsc_diff_vmexit 1.0", 6),
        ("pafish-rdtsc", "pafish cpu_rdtsc 0.6", 2),
        ("vmaware-timer-2.6", "VMAware TIMER 2.6.0", 0),
    ] {
        let elf = build_example(example);
        let output = vmm(&[
            "validate",
            "--config",
            config.to_str().unwrap(),
            "--payload",
            elf.to_str().unwrap(),
            "--json",
        ]);
        assert!(output.status.success(), "{example}: {}", stderr(&output));
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert!(
            report["payload"].as_str().unwrap().contains(name),
            "{}",
            report["payload"]
        );
        let cells = report["cells"].as_array().unwrap();
        let ran: Vec<u64> = cells
            .iter()
            .filter(|c| c["refused"].is_null())
            .map(|c| c["runs"].as_u64().expect("cells count their runs"))
            .collect();
        // Less the trap paths this KVM does not deliver (nested SVM: hardware breakpoints
        // and int3), each refused as such.
        let undelivered = PATHS.iter().filter(|p| !common::path_runs_here(p)).count();
        let expected = if cells_run > 2 {
            cells_run - undelivered
        } else {
            cells_run
        };
        assert!(ran.len() >= expected.max(1), "{example}: {}", report["cells"]);
        assert!(ran.iter().all(|&runs| runs == 2), "{example}: two repeats each");
        for refused in cells.iter().filter_map(|c| c["refused"].as_str()) {
            assert!(
                [
                    "no CPUID instruction",
                    "paravirtual CPUID",
                    "rdtscp",
                    "not delivered by this KVM"
                ]
                .iter()
                .any(|why| refused.contains(why)),
                "{example}: refused for an unexpected reason: {refused}"
            );
        }
        let payload_rule = &report["confusion"]["payload"];
        let counted: u64 = [
            "true_positive",
            "false_negative",
            "false_positive",
            "true_negative",
            "unsure_on_virtual",
            "unsure_on_native",
        ]
        .iter()
        .map(|k| payload_rule[k].as_u64().unwrap())
        .sum();
        assert_eq!(
            counted,
            ran.iter().sum::<u64>(),
            "{example}: every run's payload verdict is scored: {payload_rule}"
        );
    }
    std::fs::remove_file(&config).ok();
}

/// VMAware v2.7.0's TIMER, written with the SDK, counts in ticks of the counter vCPU: it
/// declares VMM_CAP_COUNTER, is refused without `--vcpus 2`, and with it runs in a guest
/// and natively (its twin starts a counter thread running the very same loop).
#[test]
fn vmaware_timer_2_7_needs_the_counter_and_runs_with_it_in_a_guest_and_natively() {
    let Some(_vm) = common::two_vcpus_test() else { return };
    let elf = build_example("vmaware-timer-2.7");
    let payload = elf.to_str().unwrap();
    for mode in ["native", "hw-assist"] {
        let output = vmm(&["run", "--mode", mode, "--payload", payload, "-n", "10"]);
        assert_eq!(output.status.code(), Some(1), "{mode}");
        assert!(stderr(&output).contains("add --vcpus 2"), "{mode}: {}", stderr(&output));
    }
    let inspect = String::from_utf8_lossy(&vmm(&["inspect", payload]).stdout).into_owned();
    assert!(inspect.contains("counter"), "{inspect}");
    let twin = std::fs::read(elf.with_extension("native")).unwrap();
    let loop_code = guest_payload::counter::LOOP_CODE;
    assert!(
        twin.windows(loop_code.len()).any(|w| w == loop_code),
        "the twin's counter loop is not LOOP_CODE"
    );
    for mode in ["native", "hw-assist"] {
        let report = json_run(&[
            "run",
            "--mode",
            mode,
            "--vcpus",
            "2",
            "--payload",
            payload,
            "-n",
            "10",
            "--json",
        ]);
        let verdict = verdict_of(&report, "payload");
        let why = verdict["why"].as_str().unwrap();
        assert!(why.contains("TIMER 2.7.0"), "{mode}: {why}");
        if verdict["verdict"] != "unsure" {
            // Its pairs: TIMER's batch, every tick delta at least one.
            let (cpuid, lfence) = (&report["probes"]["cpuid"], &report["probes"]["lfence8"]);
            assert_eq!(cpuid["count"], lfence["count"], "{mode}");
            assert!(cpuid["count"].as_u64().unwrap() >= 30_000, "{mode}: {cpuid}");
            assert!(
                cpuid["min"].as_i64().unwrap() >= 1 && lfence["min"].as_i64().unwrap() >= 1,
                "{mode}"
            );
        }
    }
}

/// VMAware v2.8.1's TIMER, written with the SDK: five trials of 500-1000 pairs in ticks
/// of the counter vCPU, each window valid only where the counter moved, the interquartile
/// means' minimum over the trials. Its warm-up (2,000,000 LCG rounds) and its burn between
/// pairs cost minutes where every guest instruction is emulated, so the guest runs the
/// build that shortens both (the Makefile's knobs); the twin runs VMAware's own build. A
/// KVM that runs instructions directly makes CPUID an exit among fast instructions: TIMER
/// says VM; this machine's emulating KVM is not judged (its counter ticks once an
/// emulated instruction, so both windows read a tick or two).
#[test]
fn vmaware_timer_2_8_runs_its_trials_in_a_guest_and_natively() {
    let Some(_vm) = common::two_vcpus_test() else { return };
    let faithful = build_example("vmaware-timer-2.8");
    let dir = faithful.parent().unwrap();
    let built = std::process::Command::new("make")
        .arg("-C")
        .arg(dir)
        .args([
            "NAME=vmaware-timer-2.8-quick",
            "EXTRA_CFLAGS=-DWARMUP_LCG_ROUNDS=2000 -DBURN=0",
        ])
        .output()
        .expect("make");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let quick = dir.join("vmaware-timer-2.8-quick.elf");
    let software_kvm = common::kvm_check("KVM flavour").1.starts_with("software");
    for (mode, payload) in [("native", &faithful), ("hw-assist", &quick)] {
        let report = json_run(&[
            "run",
            "--mode",
            mode,
            "--vcpus",
            "2",
            "--payload",
            payload.to_str().unwrap(),
            "--json",
        ]);
        let verdict = verdict_of(&report, "payload");
        let why = verdict["why"].as_str().unwrap();
        assert!(why.contains("TIMER 2.8.1: cpuid "), "{mode}: {why}");
        // The last trial's valid pairs: at most a batch, every window at least one tick.
        let (cpuid, reference) = (&report["probes"]["cpuid"], &report["probes"]["lfence8"]);
        assert_eq!(cpuid["count"], reference["count"], "{mode}");
        assert!(
            (1..=1000).contains(&cpuid["count"].as_u64().unwrap()),
            "{mode}: {cpuid}"
        );
        assert!(cpuid["min"].as_i64().unwrap() >= 1 && reference["min"].as_i64().unwrap() >= 1);
        if mode == "hw-assist" && !software_kvm {
            assert_eq!(verdict["verdict"], "virtual", "{why}");
        }
    }
}

/// Can this KVM run SSE arithmetic in a guest? doctor's probe: an emulating KVM (this
/// project's development host) runs SSE moves and no arithmetic, and `cvtsi2sd` stops the
/// run with the VMM naming the instruction.
fn kvm_runs_sse_arithmetic() -> bool {
    common::kvm_check("floating point in a guest").0 == "ok"
}

/// Issue 17: a detector taken as its authors wrote it, in C++ — pafish's `cpuid` asm that
/// declares no outputs and no clobbers, `double` arithmetic, an `__int128` division
/// (guest-payload/examples/vmaware-timer-2.6-cpp, `RDTSCP=0 CPUID=pafish`) — builds with
/// the SDK unchanged at -O0 and at -O2, and every path either reports its verdict or
/// stops with the VMM saying why, never a crash of the VMM:
/// * at -O0 it measures what it says: natively it reports its verdict; in a guest it does
///   where the KVM runs SSE arithmetic, and where it cannot (probed) the run stops naming
///   the instruction;
/// * at -O2 GCC may keep a value in a register CPUID overwrites (GCC 12 keeps the warm-up
///   loop's counter in ECX: the loop never ends), so the verdict may be garbage or never
///   come: the VMM reports the verdict or the hang, exit 1, by name;
/// * it does not declare paravirtual CPUID (its CPUID is the instruction): refused.
#[test]
fn a_verbatim_cpp_detector_builds_unchanged_and_every_path_reports_it() {
    let Some(_vm) = vm_test() else { return };
    let sse = kvm_runs_sse_arithmetic();
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-payload/examples/vmaware-timer-2.6-cpp");
    for opt in ["-O0", "-O2"] {
        let name = format!("verbatim-cpp{opt}");
        let built = std::process::Command::new("make")
            .arg("-C")
            .arg(&dir)
            .args([
                format!("NAME={name}"),
                format!("OPT={opt}"),
                "RDTSCP=0".into(),
                "CPUID=pafish".into(),
            ])
            .output()
            .expect("make");
        assert!(
            built.status.success(),
            "{opt}: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let elf = dir.join(format!("{name}.elf"));
        let payload = elf.to_str().unwrap();
        let inspect = String::from_utf8_lossy(&vmm(&["inspect", payload]).stdout).into_owned();
        assert!(
            inspect.contains("VMAware TIMER 2.6.0 C++ rdtsc"),
            "{opt}: the C++ declaration is found: {inspect}"
        );
        for path in PATHS {
            let mut args = vec!["run", "--payload", payload, "--json", "--timeout", "10"];
            args.extend_from_slice(path);
            let output = vmm(&args);
            let message = stderr(&output);
            if path[1] == "paravirt" {
                assert_eq!(output.status.code(), Some(1), "{opt} {path:?}");
                assert!(
                    message.contains("does not declare paravirtual CPUID"),
                    "{opt}: {message}"
                );
                continue;
            }
            if output.status.success() {
                let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                let why = verdict_of(&report, "payload")["why"].as_str().unwrap().to_owned();
                assert!(
                    why.contains("TIMER 2.6.0 C++: lfence;rdtsc;cpuid(0);lfence;rdtsc latency "),
                    "{opt} {path:?}: {why}"
                );
                assert!(
                    sse || path[1] == "native",
                    "{opt} {path:?}: ran double arithmetic on a KVM that cannot"
                );
                continue;
            }
            // Not a crash: the VMM's own error, exit 1.
            assert_eq!(output.status.code(), Some(1), "{opt} {path:?}: {message}");
            let no_sse = message.contains("KVM could not run the guest instruction");
            let hung = message.contains("did not ring \"done\"") || message.contains("ran past its timeout");
            if opt == "-O0" {
                if path[1] == "native" {
                    panic!("-O0 natively: {message}");
                }
                // The only thing an emulating KVM lacks here is SSE arithmetic; a hardware
                // KVM may lack a trap (nested SVM delivers neither int3 nor hw breakpoints).
                assert!(
                    (no_sse && !sse) || (sse && path[1] == "trap-emulate" && !no_sse && !hung),
                    "{opt} {path:?}: {message}"
                );
            } else {
                assert!(
                    hung || (no_sse && !sse) || (sse && path[1] == "trap-emulate"),
                    "{opt} {path:?}: {message}"
                );
            }
        }
    }
}

/// Shaping calibrates on the embedded timing core, not on the payload: a mean-of-ten
/// detector that reports ten unfenced CPUID timings and no `cpuid` samples runs through
/// the shipped validation matrix with no failed cell, its injected cells run on every
/// path the VMM handles, and a shaped `run` reports what it requested and says that
/// the achieved cost is the payload's to report.
#[test]
fn a_payload_that_reports_no_cpuid_samples_is_shaped_and_validated_on_the_shipped_matrix() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("pafish-rdtsc-vmexit");
    let payload = elf.to_str().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let matrix = format!("{root}/../configs/validation.json");
    let output = vmm(&["validate", "--config", &matrix, "--payload", payload, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for host in report["coverage"].as_array().unwrap() {
        assert_eq!(host["failed"], 0, "{host}");
        assert_eq!(host["missing"], 0, "{host}");
    }
    let injected: Vec<&serde_json::Value> = report["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["shaping"].as_str().unwrap().starts_with("inject-ns"))
        .filter(|c| {
            ["trap-emulate", "paravirt"]
                .iter()
                .any(|m| c["mode"].as_str().unwrap().starts_with(m))
        })
        .collect();
    assert!(!injected.is_empty(), "{}", report["cells"]);
    // Every injected cell on a path this KVM delivers ran; the others are refused as such.
    for cell in injected {
        let mode = cell["mode"].as_str().unwrap();
        let trap = mode.strip_prefix("trap-emulate:");
        if trap.is_some_and(|t| !common::kvm_delivers(t)) {
            assert!(cell["refused"].as_str().unwrap().contains("not delivered"), "{cell}");
            continue;
        }
        assert!(cell["runs"].as_u64().unwrap() > 0, "an injected cell ran: {cell}");
    }

    // io-patch: the trap every KVM delivers.
    let shaped = json_run(&[
        "run",
        "--mode",
        "trap-emulate",
        "--trap",
        "io-patch",
        "--inject-ns",
        "20000",
        "--payload",
        payload,
        "--json",
    ]);
    let shaping = &shaped["shaping"];
    assert_eq!(shaping["kind"], "inject", "{shaping}");
    assert!(shaping["baseline_cycles"].as_i64().unwrap() > 0, "{shaping}");
    assert!(shaping["achieved_cycles"].is_null(), "no cpuid samples: {shaping}");
    assert_eq!(verdict_of(&shaped, "payload")["verdict"], "virtual");
}

/// A payload whose native twin is missing: its native cells are refused, the report is
/// written, and the validation fails saying so, unless told to accept it.
#[test]
fn a_missing_twin_refuses_the_native_cells_and_fails_the_validation_unless_allowed() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("pafish-rdtsc-vmexit");
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-notwin", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lonely = dir.join("lonely.elf");
    std::fs::copy(&elf, &lonely).unwrap();
    let config = dir.join("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "twin", "repeats": 1, "iterations": 10, "warmup": 0, "modes": ["native", "hw-assist"]}"#,
    )
    .unwrap();
    let report = dir.join("report.json");
    let args = [
        "validate",
        "--config",
        config.to_str().unwrap(),
        "--payload",
        lonely.to_str().unwrap(),
        "-o",
        report.to_str().unwrap(),
    ];
    let output = vmm(&args);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("native twin"), "{}", stderr(&output));
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let native = written["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mode"] == "native")
        .unwrap();
    assert!(
        native["refused"].as_str().unwrap().contains("lonely.native"),
        "{native}"
    );
    let allowed = vmm(&[&args[..], &["--allow-missing-twin"]].concat());
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    std::fs::remove_dir_all(&dir).ok();
}

/// As root, a native twin runs unprivileged (nobody, no_new_privs) unless told
/// `--twin-user root`; a user that does not exist is refused by name.
#[test]
fn as_root_a_twin_runs_unprivileged_unless_told_otherwise() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: twins run as this user already");
        return;
    }
    let elf = build_example("pafish-rdtsc-vmexit");
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-whoami", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = dir.join("whoami.elf");
    std::fs::copy(&elf, &payload).unwrap();
    let twin = dir.join("whoami.native");
    std::fs::write(
        &twin,
        "#!/bin/sh\necho \"uid=$(id -u)\" >&2; grep NoNewPrivs /proc/self/status >&2; exit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&twin, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let payload = payload.to_str().unwrap();
    let who = |extra: &[&str]| {
        let output = vmm(&[extra, &["run", "--mode", "native", "--payload", payload]].concat());
        assert_eq!(output.status.code(), Some(1));
        stderr(&output)
    };
    let default = who(&[]);
    assert!(
        default.contains("uid=65534") && default.contains("NoNewPrivs:\\t1"),
        "{default}"
    );
    let root = who(&["--twin-user", "root"]);
    assert!(root.contains("uid=0") && root.contains("NoNewPrivs:\\t1"), "{root}");
    let unknown = who(&["--twin-user", "no-such-user-here"]);
    assert!(unknown.contains("no such user"), "{unknown}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A `vmm_payload_info` whose magic is not the SDK's is refused as such (not as an ABI
/// mismatch to rebuild), and `inspect` says so.
#[test]
fn a_declaration_with_the_wrong_magic_is_named_as_such() {
    let Some(_vm) = vm_test() else { return };
    let (dir, payload) = common::build_c_payload(
        "magic",
        r#"#include "vmm_sdk.h"
__attribute__((used)) const struct vmm_payload_info vmm_payload_info = {0x1234, VMM_ABI_VERSION, 0, "not ours"};
int vmm_detect(struct vmm_run *run) { (void)run; return VMM_STATUS_OK; }
"#,
    );
    let payload = payload.to_str().unwrap();
    let output = vmm(&["run", "--mode", "hw-assist", "--payload", payload]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("magic is 0x1234") && !message.contains("rebuild"),
        "{message}"
    );
    let inspect = String::from_utf8_lossy(&vmm(&["inspect", payload]).stdout).into_owned();
    assert!(inspect.contains("wrong magic"), "{inspect}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `vmm_print` writes a line, in the guest and in the native twin, and `--console` shows
/// both (the twin's stderr is the native console).
#[test]
fn the_console_shows_vmm_print_lines_from_the_guest_and_the_twin() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("five-cpuids");
    let payload = elf.to_str().unwrap();
    for mode in ["native", "hw-assist"] {
        let output = vmm(&["run", "--mode", mode, "--payload", payload, "--console", "-n", "10"]);
        assert!(output.status.success(), "{mode}: {}", stderr(&output));
        let text = stderr(&output);
        assert!(
            text.lines().any(|line| line.trim_end() == "five cpuids: done"),
            "{mode}: {text}"
        );
    }
}

/// checkhv_um's TSC noise floor (the SDK example): its verdict natively, and the silence
/// its code keeps where every delta falls outside (0, 10000) — a frozen clock
/// (BetterTiming's, every exit tagged) gives only zeros, on every KVM.
#[test]
fn checkhv_um_noise_floor_says_nothing_of_a_frozen_clock() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("checkhv-um-tsc-noise-floor");
    let payload = elf.to_str().unwrap();
    let native = json_run(&["run", "--json", "--mode", "native", "--payload", payload]);
    let why = verdict_of(&native, "payload")["why"].as_str().unwrap().to_owned();
    assert!(why.contains("rdtsc deltas"), "{why}");
    let frozen = json_run(&[
        "run",
        "--json",
        "--mode",
        "hw-assist",
        "--evade",
        "bettertiming",
        "--payload",
        payload,
    ]);
    let verdict = verdict_of(&frozen, "payload");
    assert_eq!(verdict["verdict"], "unsure", "{verdict}");
    assert!(
        verdict["why"]
            .as_str()
            .unwrap()
            .contains("fewer than two rdtsc deltas in (0, 10000)"),
        "{verdict}"
    );
    assert!(
        frozen["tsc_trap"]["reads"].as_u64().unwrap() >= 100_000,
        "{}",
        frozen["tsc_trap"]
    );
}

/// vmcheck (the SDK example): a plain VM fails both of its checks; BetterTiming's clock,
/// which stands still across every tagged exit, passes both with a figure of 0 (the
/// `tsc-pm-cpuid` rule catches the same run); the native twin cannot rdmsr and says so.
#[test]
fn vmcheck_catches_a_plain_vm_and_is_fooled_by_a_clock_that_stands_still() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("vmcheck");
    let payload = elf.to_str().unwrap();
    let native = json_run(&["run", "--json", "--mode", "native", "--payload", payload]);
    let why = verdict_of(&native, "payload")["why"].as_str().unwrap().to_owned();
    assert!(why.contains("msr not run (rdmsr needs ring 0"), "{why}");
    let plain = json_run(&["run", "--json", "--mode", "hw-assist", "--payload", payload]);
    let verdict = verdict_of(&plain, "payload");
    assert_eq!(verdict["verdict"], "virtual", "{verdict}");
    let why = verdict["why"].as_str().unwrap();
    assert!(
        why.contains("fail (above 200)") && why.contains("fail (above 300)"),
        "{why}"
    );
    // APERF: KVM answers with #GP (caught by the guest's own handler) unless the counters
    // are passed through, and then they move across CPUID(1): vmcheck's third check passes.
    assert!(why.contains("aperf #GP"), "{why}");
    let passed = vmm(&[
        "run",
        "--json",
        "--mode",
        "hw-assist",
        "--evade",
        "autovirt-aperfmperf",
        "--payload",
        payload,
    ]);
    if passed.status.success() {
        let report: serde_json::Value = serde_json::from_slice(&passed.stdout).unwrap();
        let why = verdict_of(&report, "payload")["why"].as_str().unwrap().to_owned();
        assert!(why.contains("aperf pass ("), "{why}");
    } else {
        assert!(
            stderr(&passed).contains("refused") || stderr(&passed).contains("not offered"),
            "{}",
            stderr(&passed)
        );
    }
    let evaded = json_run(&[
        "run",
        "--json",
        "--mode",
        "hw-assist",
        "--evade",
        "bettertiming",
        "--payload",
        payload,
    ]);
    let verdict = verdict_of(&evaded, "payload");
    assert_eq!(verdict["verdict"], "native", "{verdict}");
    let why = verdict["why"].as_str().unwrap();
    assert!(why.contains("rdtsc 0 pass") && why.contains("msr 0 pass"), "{why}");
}

/// The red pill (the SDK example): in a VM the guest kernel runs in ring 0 with its own
/// tables, so SIDT reads the guest's IDT (none: base 0) and POPF changes IF; the native
/// twin, in ring 3, loses its IF write without a fault (Popek & Goldberg's failure).
#[test]
fn red_pill_reads_the_guests_own_tables_and_popf_drops_if_only_in_ring_3() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("red-pill");
    let payload = elf.to_str().unwrap();
    let native = json_run(&["run", "--json", "--mode", "native", "--payload", payload]);
    let why = verdict_of(&native, "payload")["why"].as_str().unwrap().to_owned();
    assert!(why.contains("popf-if dropped"), "{why}");
    for mode in [
        &["--mode", "hw-assist"][..],
        &["--mode", "trap-emulate", "--trap", "io-patch"],
    ] {
        if !common::path_runs_here(mode) {
            continue;
        }
        let report = json_run(&[&["run", "--json", "--payload", payload][..], mode].concat());
        let verdict = verdict_of(&report, "payload");
        assert_eq!(verdict["verdict"], "unsure", "{mode:?}: {verdict}");
        let why = verdict["why"].as_str().unwrap();
        assert!(
            why.contains("sidt 0x0 ") && why.contains("popf-if ok"),
            "{mode:?}: {why}"
        );
    }
}

/// VMAware's #DB check (the SDK example): a trap-flag single step against the same
/// handler entered by software. A hardware-semantics KVM intercepts every guest #DB (SVM
/// and VMX alike, since CVE-2015-8104), so each step is a VM exit and the check calls any
/// KVM virtual; this machine's software KVM delivers the step inside the guest, and the
/// check is fooled. Under `--trap hw-breakpoint` (where KVM delivers debug exits) the
/// guest's own steps reach the VMM, which gives them back: the run completes.
#[test]
fn vmaware_db_catches_a_kvm_that_intercepts_db_and_a_guest_single_step_survives_the_trap() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("vmaware-db");
    let payload = elf.to_str().unwrap();
    let native = json_run(&["run", "--json", "--mode", "native", "--payload", payload]);
    let why = verdict_of(&native, "payload")["why"].as_str().unwrap().to_owned();
    assert!(why.contains("single-step #DB ") && why.contains("ratio "), "{why}");
    let software_kvm = common::kvm_check("KVM flavour").1.starts_with("software");
    let plain = json_run(&["run", "--json", "--mode", "hw-assist", "--payload", payload]);
    let verdict = verdict_of(&plain, "payload");
    let expected = if software_kvm { "native" } else { "virtual" };
    assert_eq!(verdict["verdict"], expected, "software KVM: {software_kvm}: {verdict}");
    let trap = ["--mode", "trap-emulate", "--trap", "hw-breakpoint"];
    if common::path_runs_here(&trap) {
        let trapped = json_run(&[&["run", "--json", "--payload", payload][..], &trap].concat());
        let verdict = verdict_of(&trapped, "payload");
        // Every step that reached the VMM went back to the guest, and then cost an exit.
        let reflected = trapped["exits"]["guest-exception-reflected"]["count"]
            .as_u64()
            .unwrap_or(0);
        if reflected > 0 {
            assert_eq!(verdict["verdict"], "virtual", "{reflected} steps reflected: {verdict}");
        } else {
            assert_eq!(verdict["verdict"], expected, "no step reached the VMM: {verdict}");
        }
    } else {
        common::assert_trap_refused(&[&["--payload", payload][..], &trap].concat());
    }
}
