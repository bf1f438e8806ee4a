//! Validation as CI uses it: shards merged back into the whole, hosts side by side,
//! requirements as a gate, JUnit for the CI system.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

mod common;

use common::{kvm_moves_tsc, kvm_scales_tsc, stderr, vm_test, vmm};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A scratch directory for one test's files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-ci-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every VM path, shaping that runs here and shaping that is refused here (TSC moves), and
/// a profile (seeded draws): 3 repeats of few samples.
const MATRIX: &str = r#"{"description": "sharding test", "repeats": 3, "iterations": 50, "warmup": 5,
  "modes": ["native", "hw-assist", "trap-emulate:int3-patch", "trap-emulate:io-patch", "paravirt"],
  "shaping": ["none", "inject-ns:20000", "hide", "profile:vtx-hw-assist"]}"#;

fn read(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn validate(args: &[&str]) -> std::process::Output {
    vmm(&[&["validate"][..], args].concat())
}

/// (cell, repeat) of every run, sorted.
fn jobs(report: &Value) -> Vec<(u64, u64)> {
    let mut jobs: Vec<(u64, u64)> = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["cell"].as_u64().unwrap(), r["repeat"].as_u64().unwrap()))
        .collect();
    jobs.sort_unstable();
    jobs
}

#[test]
fn three_shards_merged_are_the_unsharded_run() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("shards");
    let config = dir.path("matrix.json");
    std::fs::write(&config, MATRIX).unwrap();
    let whole = dir.path("whole.json");
    let output = validate(&["--config", &config, "-o", &whole]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut shards = Vec::new();
    for k in 1..=3 {
        let shard = dir.path(&format!("shard{k}.json"));
        let output = validate(&["--config", &config, "--shard", &format!("{k}/3"), "-o", &shard]);
        assert!(output.status.success(), "shard {k}: {}", stderr(&output));
        shards.push(shard);
    }
    let merged = dir.path("merged.json");
    let output = vmm(&[
        &["merge"][..],
        &shards.iter().map(String::as_str).collect::<Vec<_>>(),
        &["-o", &merged],
    ]
    .concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let (whole, merged) = (read(&whole), read(&merged));

    // The same runs: every cell × repeat that ran once, exactly once across the shards.
    assert_eq!(jobs(&merged), jobs(&whole));
    assert!(!jobs(&whole).is_empty());
    // The same refusals (hide and the profile need TSC moves here), job for job.
    let refused = |r: &Value| -> u64 { r["coverage"][0]["refused"].as_u64().unwrap() };
    assert_eq!(refused(&merged), refused(&whole));
    assert_eq!(merged["coverage"][0]["missing"], 0, "{}", merged["coverage"]);
    // The same cells with the same run counts, and each rule judged the same number of runs.
    let cells = |r: &Value| -> Vec<(String, String, u64)> {
        r["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let label = format!("{} | {}", c["mode"], c["shaping"]);
                (
                    label,
                    c["truth"].as_str().unwrap().to_owned(),
                    c["runs"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(cells(&merged), cells(&whole));
    // Rules whose verdict does not depend on timing noise agree count for count.
    for rule in ["fixed-threshold", "hypervisor-bit", "code-integrity", "tsc-monotonic"] {
        for key in ["true_positive", "false_negative", "false_positive", "true_negative"] {
            assert_eq!(
                merged["confusion"][rule][key], whole["confusion"][rule][key],
                "{rule} {key}"
            );
        }
    }
    // A shard left out is said, not taken for the whole: PARTIAL, naming the shard, the
    // JUnit report fails its coverage case, and the merge exits 1 after writing it all
    // (a requirement that holds on what is there does not turn it green).
    let junit = dir.path("partial.xml");
    let output = vmm(&[
        "merge",
        &shards[0],
        &shards[2],
        "--json",
        "--junit",
        &junit,
        "--require",
        "hypervisor-bit:tpr>=0.5",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("PARTIAL") && stderr(&output).contains("shards not given: 2/3"),
        "{}",
        stderr(&output)
    );
    let partial: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(partial["matrix_coverage"]["missing_shards"], serde_json::json!(["2/3"]));
    assert!(partial["matrix_coverage"]["missing"].as_u64().unwrap() > 0);
    assert_eq!(merged["matrix_coverage"]["missing"], 0);
    assert!(std::fs::read_to_string(&junit)
        .unwrap()
        .contains("classname=\"coverage\""));
    let text = vmm(&["merge", &shards[0], &shards[2], "--allow-partial"]);
    assert!(text.status.success(), "told to: {}", stderr(&text));
    assert!(String::from_utf8_lossy(&text.stdout).contains("matrix: PARTIAL"));
    // One shard alone, gated: its figures are named as the slice's.
    let one = vmm(&[
        "merge",
        &shards[1],
        "--allow-partial",
        "--json",
        "--require",
        "hypervisor-bit:tpr>=0.5",
    ]);
    let one: Value = serde_json::from_slice(&one.stdout).unwrap();
    let why = one["requirements"][0]["why"].as_str().unwrap();
    assert!(why.contains("this slice of the matrix only"), "{why}");
    // A shard given twice is refused, naming the run.
    let output = vmm(&["merge", &shards[0], &shards[1], &shards[0]]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("a shard given twice"), "{}", stderr(&output));
    // A report of another matrix is refused.
    let other = dir.path("other.json");
    std::fs::write(&config, MATRIX.replace("\"repeats\": 3", "\"repeats\": 1")).unwrap();
    assert!(validate(&["--config", &config, "--shard", "1/3", "-o", &other])
        .status
        .success());
    let output = vmm(&["merge", &shards[0], &other]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("its matrix differs"), "{}", stderr(&output));
    // And one of another schema version, by its version.
    let mut old = read(&shards[1]);
    old["schema_version"] = 2.into();
    std::fs::write(&other, old.to_string()).unwrap();
    let output = vmm(&["merge", &shards[0], &other]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("schema version is 2"), "{}", stderr(&output));
}

#[test]
fn merging_two_hosts_shows_both_in_the_per_host_table() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("hosts");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "two hosts", "repeats": 2, "iterations": 50, "warmup": 5, "modes": ["native", "hw-assist"]}"#,
    )
    .unwrap();
    let (a, b) = (dir.path("a.json"), dir.path("b.json"));
    assert!(validate(&["--config", &config, "-o", &a]).status.success());
    assert!(validate(&["--config", &config, "-o", &b]).status.success());
    // The second report as another host would write it: a bare-metal Intel machine.
    let mut other = read(&b);
    other["hosts"][0]["cpu_model"] = "Intel(R) Xeon(R) Gold 6338".into();
    other["hosts"][0]["nested"] = false.into();
    // There its native runs are native ground truth (cell 0 is the native cell).
    for run in other["runs"].as_array_mut().unwrap() {
        if run["cell"] == 0 {
            run["truth"] = "native".into();
        }
    }
    std::fs::write(&b, other.to_string()).unwrap();
    let markdown = dir.path("merged.md");
    let output = vmm(&["merge", &a, &b, "--json", "--markdown", &markdown]);
    assert!(output.status.success(), "{}", stderr(&output));
    let merged: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(merged["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(merged["per_host"].as_array().unwrap().len(), 2);
    let total = |rule: &str, key: &str| merged["confusion"][rule][key].as_u64().unwrap();
    let per_host =
        |host: usize, rule: &str, key: &str| merged["per_host"][host]["confusion"][rule][key].as_u64().unwrap();
    for key in ["true_positive", "false_negative", "false_positive", "true_negative"] {
        assert_eq!(
            total("hypervisor-bit", key),
            per_host(0, "hypervisor-bit", key) + per_host(1, "hypervisor-bit", key),
            "{key}: the total is the hosts' sum"
        );
    }
    // The bare-metal host's native runs are native truth: an FPR exists now, and the
    // native cell has a row per truth.
    assert!(merged["confusion"]["hypervisor-bit"]["fpr"].is_number());
    let native_rows = merged["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["mode"] == "native")
        .count();
    assert_eq!(native_rows, 2, "{}", merged["cells"]);
    let text = std::fs::read_to_string(&markdown).unwrap();
    // This host, whatever its CPU, and the other one.
    let here = read(&a)["hosts"][0]["cpu_model"].as_str().unwrap().to_owned();
    assert!(
        text.contains(&format!("| 0 | {here} |")) && text.contains("| 1 | Intel(R) Xeon(R) Gold 6338 |"),
        "{text}"
    );
    assert!(text.contains("### Host 1"), "{text}");
}

#[test]
fn requirements_gate_the_exit_status_and_junit_reports_every_cell_and_rule() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("gate");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "gate", "repeats": 2, "iterations": 50, "warmup": 5,
            "modes": ["hw-assist", "trap-emulate:io-patch", "paravirt"], "shaping": ["none", "hide"]}"#,
    )
    .unwrap();
    // Holds here: the hypervisor bit is set in every VM.
    let output = validate(&["--config", &config, "--require", "hypervisor-bit:tpr>=0.99"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // ... on its point estimate: a dozen runs cannot support 0.99, and it says so.
    assert!(
        stderr(&output).contains("hypervisor-bit:tpr>=0.99 holds on the point estimate only")
            && stderr(&output).contains("368 runs"),
        "{}",
        stderr(&output)
    );
    // Does not: io-patch is the only patching path here, one cell in three.
    let junit = dir.path("junit.xml");
    let json = dir.path("report.json");
    let output = validate(&[
        "--config",
        &config,
        "--require",
        "hypervisor-bit:tpr>=0.99",
        "--require",
        "code-integrity:tpr>=0.9",
        "--junit",
        &junit,
        "-o",
        &json,
    ]);
    assert_eq!(output.status.code(), Some(1));
    // The outputs were written all the same: nothing measured is lost to a failed gate.
    let report = read(&json);
    // What ran depends on the KVM (hide runs only where TSC moves are honoured: doctor's
    // probe), so the expected figures are counted from the cells and checked against it.
    let cells = report["cells"].as_array().unwrap();
    let ran: Vec<&serde_json::Value> = cells.iter().filter(|c| c["refused"].is_null()).collect();
    let refused = cells.len() - ran.len();
    let hide_ran = ran.iter().filter(|c| c["shaping"] == "hide").count();
    // hide on paravirt and io-patch where TSC moves are honoured; never on hw-assist.
    assert_eq!(hide_ran, if kvm_moves_tsc() { 2 } else { 0 }, "{}", report["cells"]);
    let patched = ran.iter().filter(|c| c["mode"] == "trap-emulate:io-patch").count();
    let tpr = patched as f64 / ran.len() as f64;
    let message = stderr(&output);
    assert!(
        message.contains(&format!("code-integrity TPR {tpr:.4} fails >= 0.9")),
        "{message}"
    );
    assert!(
        !message.contains("hypervisor-bit TPR"),
        "only the unmet one is named: {message}"
    );
    assert_eq!(report["requirements"].as_array().unwrap().len(), 2);
    let xml = std::fs::read_to_string(&junit).unwrap();
    // Every cell that ran × its rules (those of every run, the clock rules: every run here
    // reads clocks, and those of the default probes: counted from the registry), one
    // skipped case per refused cell, 2 requirements.
    let rules = common::rules_of_a_default_run();
    for cell in &ran {
        assert_eq!(cell["rules"].as_object().unwrap().len(), rules, "{cell}");
    }
    let cases = ran.len() * rules + refused + 2;
    assert_eq!(xml.matches("<testcase ").count(), cases, "{xml}");
    assert_eq!(xml.matches("<skipped ").count(), refused, "{xml}");
    assert!(
        xml.contains("classname=\"requirements\" name=\"code-integrity:tpr&gt;=0.9\""),
        "{xml}"
    );
    assert!(xml.contains(&format!("tests=\"{cases}\"")), "{xml}");
    // A requirement the tool cannot parse is refused before anything runs.
    let output = validate(&["--config", &config, "--require", "robust:speed>=1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unknown metric"), "{}", stderr(&output));
    // So is one in the matrix file.
    std::fs::write(
        &config,
        r#"{"description": "gate", "repeats": 1, "iterations": 10, "modes": ["hw-assist"], "requirements": ["nope:tpr>=1"]}"#,
    )
    .unwrap();
    let output = validate(&["--config", &config]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("unknown rule `nope`"), "{}", stderr(&output));
}

#[test]
fn shard_auto_reads_the_batch_engine() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("auto");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "auto", "repeats": 4, "iterations": 10, "warmup": 0, "modes": ["hw-assist"]}"#,
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["validate", "--config", &config, "--shard", "auto", "--json"])
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("VMM_SHARD_INDEX")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.code(),
            serde_json::from_slice::<Value>(&output.stdout).ok(),
            stderr(&output),
        )
    };
    // A Kubernetes Indexed Job, pod 1 of 2: jobs 1 and 3.
    let (code, report, _) = run(&[("JOB_COMPLETION_INDEX", "1"), ("VMM_SHARD_COUNT", "2")]);
    assert_eq!(code, Some(0));
    assert_eq!(jobs(&report.unwrap()), vec![(0, 1), (0, 3)]);
    // A Slurm array --array=1-4, task 4: job 3 alone.
    let (_, report, _) = run(&[
        ("SLURM_ARRAY_TASK_ID", "4"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ]);
    assert_eq!(jobs(&report.unwrap()), vec![(0, 3)]);
    let (code, _, message) = run(&[]);
    assert_eq!(code, Some(1));
    assert!(message.contains("JOB_COMPLETION_INDEX"), "{message}");
    assert!(Path::new(&config).exists());
}

/// SIGINT in the middle of a validation: it stops after the run in progress, writes a
/// readable report of what finished, marked partial, and exits 130. A command that fails
/// leaves the previous output as it was.
#[test]
fn an_interrupted_validation_writes_what_finished_and_a_failed_run_erases_nothing() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("interrupt");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "long", "repeats": 10000, "iterations": 200, "warmup": 0, "modes": ["hw-assist"]}"#,
    )
    .unwrap();
    let report = dir.path("report.json");
    std::fs::write(&report, "the previous report").unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["validate", "--config", &config, "-o", &report])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: a signal to our own child, by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(stderr(&output).contains("interrupted by SIGINT"), "{}", stderr(&output));
    let partial = read(&report);
    assert!(
        partial["interrupted"].as_str().unwrap().contains("SIGINT"),
        "{}",
        partial["interrupted"]
    );
    let ran = partial["runs"].as_array().unwrap().len();
    assert!(ran > 0 && ran < 10_000, "{ran} runs");
    assert!(partial["matrix_coverage"]["missing"].as_u64().unwrap() > 0);
    // Nothing but the report is left in the directory: no temporary file.
    let files: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");

    // A run that fails (here a guest that faults) leaves the old output as it was.
    let csv = dir.path("samples.csv");
    std::fs::write(&csv, "the previous samples").unwrap();
    let output = vmm(&["run", "--mode", "hw-assist", "--misbehave", "fault", "--csv", &csv]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), "the previous samples");
}

/// The arms race as `validate` stages it: evasions are a dimension of the matrix, cells a
/// KVM cannot run are refused by name (TSC moves and TSC scaling here), and the report has
/// the detector × evasion table, in JSON and as text.
#[test]
fn validate_stages_evasions_and_reports_which_each_rule_sees_through() {
    let Some(_vm) = common::two_vcpus_test() else { return };
    let dir = Scratch::new("arms");
    let config = dir.path("arms.json");
    std::fs::write(
        &config,
        r#"{"description": "arms race, small", "repeats": 2, "iterations": 100, "warmup": 5, "vcpus": 2,
  "modes": ["trap-emulate:io-patch"], "shaping": ["inject-ns:200000", "profile:hyperv-root"],
  "evasions": ["none", "pause-counter", "tsc-khz:1000000"]}"#,
    )
    .unwrap();
    let out = dir.path("report.json");
    let output = validate(&["--config", &config, "-o", &out]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("detector × what the cells stage"), "{text}");
    let report = read(&out);
    assert_eq!(report["matrix"]["vcpus"], 2);
    let cells = report["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    let refused = |shaping: &str, evasion: &str| {
        let cell = cells
            .iter()
            .find(|c| c["shaping"] == shaping && c["evasion"] == evasion)
            .unwrap_or_else(|| panic!("no cell {shaping} {evasion}"));
        cell["refused"].as_str().map(str::to_owned)
    };
    // Each refusal as doctor's probes predict it: TSC scaling and TSC moves.
    let scaled = refused("inject-ns:200000", "tsc-khz:1000000");
    if kvm_scales_tsc() {
        assert_eq!(scaled, None);
    } else {
        assert!(scaled.unwrap().contains("KVM_CAP_TSC_CONTROL"));
    }
    // The root partition is a host: its cells are native, and run only where TSC moves
    // are honoured.
    let root = cells.iter().find(|c| c["shaping"] == "profile:hyperv-root").unwrap();
    assert_eq!(root["truth"], "native");
    let root_refusal = refused("profile:hyperv-root", "none");
    if kvm_moves_tsc() {
        assert_eq!(root_refusal, None, "nested or hardware: the root partition runs");
    } else {
        assert!(root_refusal.unwrap().contains("TSC moves"));
    }
    assert_eq!(refused("inject-ns:200000", "pause-counter"), None);
    let race = &report["arms_race"];
    let columns: Vec<&str> = race["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["arms"].as_str().unwrap())
        .collect();
    let column = |arms: &str| {
        columns
            .iter()
            .position(|&c| c == arms)
            .unwrap_or_else(|| panic!("no column {arms}: {columns:?}"))
    };
    // Pausing the counter is what counter-stall is there for; TIMER sees the spin unpaused.
    let (plain, paused) = (column("inject-ns:200000"), column("inject-ns:200000+pause-counter"));
    assert_eq!(race["rules"]["counter-stall"][paused], 1.0, "{race}");
    // This project's software KVM: TIMER sees every unpaused spin. (Under QEMU's TCG two
    // vCPUs run too unevenly for TIMER to mean anything: 0.0 unpaused and 0.5 paused seen.)
    if !kvm_moves_tsc() {
        let timer = |column: usize| race["rules"]["vmaware-timer-2.7"][column].as_f64().unwrap();
        assert_eq!(timer(plain), 1.0, "{race}");
        assert!(timer(plain) >= timer(paused), "{race}");
    }
}

/// Each cell's CPUID distribution (p50/p95/p99 pooled over its runs) and its
/// Kolmogorov–Smirnov distance to the native reference: 0 for the native cell itself, 1
/// for a clock that reads 0 throughout (BetterTiming's, every exit tagged), in the JSON and
/// the Markdown.
#[test]
fn validate_reports_each_cells_distribution_and_its_distance_to_native() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("distribution");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "distance", "repeats": 2, "iterations": 200, "warmup": 10,
            "modes": ["native", "hw-assist"], "evasions": ["none", "bettertiming"]}"#,
    )
    .unwrap();
    let json = dir.path("report.json");
    let markdown = dir.path("report.md");
    let output = validate(&["--config", &config, "-o", &json, "--markdown", &markdown]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = read(&json);
    let cell = |mode: &str, evasion: &str| {
        report["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["mode"] == mode && c["evasion"] == evasion)
            .unwrap_or_else(|| panic!("no {mode} {evasion} cell in {}", report["cells"]))
            .clone()
    };
    let native = &cell("native", "none")["distributions"]["cpuid"];
    assert_eq!(native["ks_to_native"], 0.0, "{native}");
    let (p50, p95, p99) = (
        native["p50"].as_i64().unwrap(),
        native["p95"].as_i64().unwrap(),
        native["p99"].as_i64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p95 && p95 <= p99, "{native}");
    let frozen = &cell("hw-assist", "bettertiming")["distributions"]["cpuid"];
    assert_eq!(
        (frozen["p99"].as_i64(), frozen["ks_to_native"].as_f64()),
        (Some(0), Some(1.0)),
        "{frozen}"
    );
    let vm = cell("hw-assist", "none")["distributions"]["cpuid"]["ks_to_native"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&vm), "{vm}");
    // Every probe the runs took, not CPUID alone; the native cell is its own reference.
    for probe in ["cpuid-unfenced", "nop", "rdtsc", "lfence8"] {
        let d = &cell("native", "none")["distributions"][probe];
        assert_eq!(d["ks_to_native"], 0.0, "{probe}: {d}");
        assert!(
            cell("hw-assist", "none")["distributions"][probe]["p99"].is_number(),
            "{probe}"
        );
    }
    let text = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        text.contains("## Each probe per cell, against native") && text.contains("### lfence8"),
        "{text}"
    );
    assert!(
        text.contains("| hw-assist | none | bettertiming | 0 | virtual | 0 | 0 | 0 | 1.000 |"),
        "{text}"
    );
}

/// A sweep (`inject-ns:A..B/S`): a cell per value, read back as a detection curve per rule
/// with an interval at each point and where each rule starts to detect, in the JSON and
/// the Markdown.
#[test]
fn a_sweep_becomes_a_detection_curve_per_rule() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("sweep");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "sweep", "repeats": 2, "iterations": 50, "warmup": 5,
            "modes": ["paravirt"], "shaping": ["inject-ns:2000..6000/2000"]}"#,
    )
    .unwrap();
    let json = dir.path("report.json");
    let markdown = dir.path("report.md");
    let (roc, curves) = (dir.path("roc.svg"), dir.path("curves.svg"));
    let output = validate(&[
        "--config",
        &config,
        "-o",
        &json,
        "--markdown",
        &markdown,
        "--roc-plot",
        &roc,
        "--sweep-plot",
        &curves,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = read(&json);
    let sweep = &report["sweeps"][0];
    assert_eq!(sweep["swept"], "inject-ns", "{sweep}");
    assert_eq!(sweep["cells"], "paravirt | inject-ns:* | busy 0");
    assert_eq!(sweep["values"], serde_json::json!([2000, 4000, 6000]));
    let rules = sweep["rules"].as_object().unwrap();
    assert!(rules.contains_key("fixed-threshold"), "{sweep}");
    for (rule, curve) in rules {
        let points = curve["points"].as_array().unwrap();
        assert_eq!(points.len(), 3, "{rule}");
        for point in points {
            assert_eq!(point["runs"], 2, "{rule}: {point}");
            let (rate, lower, upper) = (
                point["rate"].as_f64().unwrap(),
                point["interval"]["lower"].as_f64().unwrap(),
                point["interval"]["upper"].as_f64().unwrap(),
            );
            assert!(lower <= rate && rate <= upper, "{rule}: {point}");
        }
        // Where it is flagged at every point, it detects from the first.
        if points.iter().all(|p| p["rate"] == 1.0) {
            assert_eq!(curve["half"]["at"], 2000, "{rule}: {curve}");
        }
    }
    let text = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        text.contains(r"## Sweep of inject-ns on paravirt \| inject-ns:\* \| busy 0 (virtual)"),
        "{text}"
    );
    // No native truth here (or nested): the ROC puts the sweep's ends against each other,
    // each rule's AUC in [0, 1]; both figures drawn and linked from the Markdown.
    let roc_report = &report["roc"];
    assert!(
        roc_report["negatives"].as_str().unwrap().contains("at 2000"),
        "{roc_report}"
    );
    for (rule, curve) in roc_report["rules"].as_object().unwrap() {
        let auc = curve["auc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auc), "{rule}: {curve}");
    }
    for (svg, words) in [(&roc, "AUC"), (&curves, "share of runs flagged virtual")] {
        let drawn = std::fs::read_to_string(svg).unwrap();
        assert!(drawn.starts_with("<svg") && drawn.contains(words), "{svg}");
    }
    assert!(
        text.contains("![ROC per rule](roc.svg)") && text.contains("(curves.svg)"),
        "{text}"
    );
    // A matrix with no sweep has no curves to draw: said, exit 1, the rest written.
    std::fs::write(
        &config,
        r#"{"description": "flat", "repeats": 1, "iterations": 20, "warmup": 5, "modes": ["paravirt"]}"#,
    )
    .unwrap();
    let output = validate(&["--config", &config, "--sweep-plot", &curves, "-o", &json]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("--sweep-plot: nothing to draw, the matrix has no sweep"),
        "{}",
        stderr(&output)
    );
    assert_eq!(read(&json)["description"], "flat", "the report was written");
}

/// `--precision`: each cell runs until every rule's 95% interval is narrow enough, up to
/// `--max-repeats`; cells whose verdicts never vary stop early, and the jobs they leave
/// are covered, not missing. Shards stop each on their own runs and still merge whole.
#[test]
fn precision_stops_a_cell_once_its_intervals_are_narrow_and_shards_still_merge() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("precision");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "precision", "repeats": 1, "iterations": 20, "warmup": 5,
            "modes": ["hw-assist", "paravirt"]}"#,
    )
    .unwrap();
    let json = dir.path("report.json");
    // Width 0.5: ten runs all alike give [0.69, 1], 0.31 wide; six give [0.54, 1].
    let args = ["--config", &config, "--precision", "0.5", "--max-repeats", "30"];
    let output = validate(&[&args[..], &["-o", &json]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let report = read(&json);
    assert_eq!(report["matrix_coverage"]["missing"], 0, "{}", report["matrix_coverage"]);
    for cell in report["cells"].as_array().unwrap() {
        let runs = cell["runs"].as_u64().unwrap();
        let stopped = cell["stopped"][0].as_str().unwrap_or_default();
        // A rule that flips between runs keeps its cell going; one that never does stops
        // it at 6 runs, the fewest whose interval is at most 0.5 wide.
        if stopped.starts_with("stopped after") {
            assert!((6..30).contains(&runs), "{cell}");
        } else {
            assert_eq!(runs, 30, "{cell}");
            assert!(stopped.contains("the bound of 30 runs was reached first"), "{cell}");
        }
    }
    let coverage = &report["coverage"][0];
    assert_eq!(
        coverage["ran"].as_u64().unwrap() + coverage["stopped"].as_u64().unwrap(),
        coverage["jobs"].as_u64().unwrap(),
        "{coverage}"
    );
    // Two shards, merged: complete, each shard's stop kept.
    let (one, two) = (dir.path("one.json"), dir.path("two.json"));
    for (shard, out) in [("1/2", &one), ("2/2", &two)] {
        let output = validate(&[&args[..], &["--shard", shard, "-o", out]].concat());
        assert!(output.status.success(), "{shard}: {}", stderr(&output));
    }
    let merged_path = dir.path("merged.json");
    let output = vmm(&["merge", &one, &two, "-o", &merged_path]);
    assert!(output.status.success(), "{}", stderr(&output));
    let merged = read(&merged_path);
    assert_eq!(merged["matrix_coverage"]["missing"], 0, "{}", merged["matrix_coverage"]);
    assert_eq!(merged["stops"].as_array().unwrap().len(), 4, "two cells, two shards");
    // A merged report is read again as it was written (a fleet merges per-host merges).
    let again = dir.path("again.json");
    let output = vmm(&["merge", &merged_path, "-o", &again]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(read(&again)["matrix_coverage"]["missing"], 0);
    // A bound no cell can stop before is said before anything runs.
    let output = validate(&["--config", &config, "--precision", "0.1", "--max-repeats", "5"]);
    assert!(
        stderr(&output).contains("--precision 0.1 needs at least 36 runs a cell even where every run agrees"),
        "{}",
        stderr(&output)
    );
    // --max-repeats bounds --precision: alone it is refused.
    let output = validate(&["--config", &config, "--max-repeats", "10"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("--max-repeats bounds the runs of --precision"),
        "{}",
        stderr(&output)
    );
}

/// A run that fails is retried once in a fresh VM, and the failed attempt stays in the
/// report (text, JSON, Markdown), never dropped: a guest that triple-faults fails twice,
/// and the validation fails, naming both.
#[test]
fn a_failed_run_is_retried_in_a_fresh_vm_and_both_attempts_are_reported() {
    let Some(_vm) = vm_test() else { return };
    use vmm::vm::loader::{test_support::tiny_elf, EM_X86_64};
    let dir = Scratch::new("retry");
    let elf = dir.path("ud2.elf");
    std::fs::write(
        &elf,
        tiny_elf(EM_X86_64, guest_payload::layout::PAYLOAD_START, &[0x0f, 0x0b]),
    )
    .unwrap();
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "retry", "repeats": 2, "iterations": 20, "modes": ["hw-assist"]}"#,
    )
    .unwrap();
    let (json, md) = (dir.path("report.json"), dir.path("report.md"));
    let output = validate(&["--config", &config, "--payload", &elf, "-o", &json, "--markdown", &md]);
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert_eq!(message.matches("retrying it in a fresh VM").count(), 2, "{message}");
    let report = read(&json);
    assert_eq!(report["retried"].as_array().unwrap().len(), 2, "{}", report["retried"]);
    assert_eq!(
        report["failures"].as_array().unwrap().len(),
        2,
        "{}",
        report["failures"]
    );
    assert!(
        report["retried"][0]["why"].as_str().unwrap().contains("triple"),
        "{}",
        report["retried"]
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.matches("retried in a fresh VM").count(), 2, "{text}");
    let markdown = std::fs::read_to_string(&md).unwrap();
    assert!(markdown.contains("## Runs retried in a fresh VM"), "{markdown}");
}

#[test]
fn evidence_keeps_each_runs_samples_and_verdicts_per_cell() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("evidence");
    let config = dir.path("matrix.json");
    std::fs::write(
        &config,
        r#"{"description": "evidence", "repeats": 2, "iterations": 40, "warmup": 5,
            "modes": ["native", "trap-emulate:io-patch"]}"#,
    )
    .unwrap();
    let (json, evidence) = (dir.path("report.json"), dir.path("evidence"));
    let output = validate(&["--config", &config, "-o", &json, "--evidence", &evidence]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = read(&json);
    let mut cells: Vec<String> = std::fs::read_dir(&evidence)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    cells.sort();
    assert_eq!(
        cells,
        ["000-native_none_busy_0", "001-trap-emulate_io-patch_none_busy_0"],
        "{cells:?}"
    );
    for (index, cell) in cells.iter().enumerate() {
        for repeat in 0..2u64 {
            let run = read(&format!("{evidence}/{cell}/run-{}.json", repeat + 1));
            // Every sample the verdicts rest on, and the verdicts the report counted.
            assert_eq!(run["samples"]["cpuid"].as_array().map(Vec::len), Some(40), "{cell}");
            let record = report["runs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["cell"] == index as u64 && r["repeat"] == repeat)
                .unwrap_or_else(|| panic!("no run {repeat} of cell {index} in the report"));
            let counted = record["verdicts"].as_array().unwrap();
            assert_eq!(run["verdicts"].as_array().unwrap().len(), counted.len(), "{cell}");
            for verdict in run["verdicts"].as_array().unwrap() {
                let kept = counted.iter().find(|v| v["rule"] == verdict["rule"]).unwrap();
                assert_eq!(
                    kept["verdict"], verdict["verdict"],
                    "{cell} run {repeat}: {}",
                    verdict["rule"]
                );
            }
        }
    }
    // A directory that cannot be made is an error naming it, after nothing was lost.
    let blocked = dir.path("a-file");
    std::fs::write(&blocked, "").unwrap();
    let output = validate(&["--config", &config, "--evidence", &blocked]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot write"), "{}", stderr(&output));
}
