//! Outputs as a user meets them: whatever is at an output's path — a FIFO, a link, a
//! device, a private file — is written as that, never replaced by a regular file; two
//! outputs on one file are refused before anything runs; an interrupted run leaves no
//! temporary file; and a forged report handed to `merge` is refused or shown escaped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly
mod common;

use common::{stderr, vm_test, vmm};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-outputs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().unwrap().to_owned()
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn c_path(path: &str) -> std::ffi::CString {
    std::ffi::CString::new(path).unwrap()
}

fn run_csv(csv: &str) -> std::process::Output {
    vmm(&["run", "-n", "10", "--csv", csv])
}

fn is_csv(text: &str) -> bool {
    text.lines().count() > 10 && text.lines().next().is_some_and(|header| header.contains(','))
}

#[test]
fn a_fifo_is_written_into() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("fifo");
    let fifo = dir.path("fifo");
    // SAFETY: a NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path(&fifo).as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let output = run_csv(&fifo);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = reader.join().unwrap();
    assert!(is_csv(&text), "{text}");
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");
    assert_eq!(dir.entries(), ["fifo"]);
}

#[test]
fn a_link_stays_a_link_and_its_target_gets_the_output() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("link");
    std::fs::write(dir.path("target.csv"), "old").unwrap();
    std::os::unix::fs::symlink("target.csv", dir.path("link.csv")).unwrap();
    let output = run_csv(&dir.path("link.csv"));
    assert!(output.status.success(), "{}", stderr(&output));
    let link = dir.path("link.csv");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("target.csv"));
    assert!(is_csv(&std::fs::read_to_string(dir.path("target.csv")).unwrap()));
    assert_eq!(dir.entries(), ["link.csv", "target.csv"]);
}

#[test]
fn a_private_file_stays_private() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("mode");
    let csv = dir.path("private.csv");
    std::fs::write(&csv, "old").unwrap();
    std::fs::set_permissions(&csv, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = run_csv(&csv);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::metadata(&csv).unwrap().mode() & 0o7777, 0o600);
    assert!(is_csv(&std::fs::read_to_string(&csv).unwrap()));
    assert_eq!(dir.entries(), ["private.csv"]);
}

#[test]
fn a_character_device_is_written_into_not_replaced() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("device");
    let null = dir.path("null");
    // /dev/null's numbers, in a scratch directory: the machine's own is never at stake.
    // SAFETY: a NUL-terminated path; mknod only creates the node.
    let made = unsafe { libc::mknod(c_path(&null).as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    if made != 0 {
        eprintln!("*** SKIPPED: mknod needs root: {}", std::io::Error::last_os_error());
        return;
    }
    let output = run_csv(&null);
    assert!(output.status.success(), "{}", stderr(&output));
    let metadata = std::fs::metadata(&null).unwrap();
    assert!(metadata.file_type().is_char_device(), "still a device");
    assert_eq!(metadata.rdev(), libc::makedev(1, 3));
    assert_eq!(dir.entries(), ["null"]);
}

#[test]
fn two_outputs_on_one_file_are_refused_before_the_run() {
    let dir = Scratch::new("twice");
    let same = dir.path("same.out");
    // Refused before the run: no VM is needed to see it (a --misbehave hang would time out).
    let output = vmm(&[
        "run",
        "--timeout",
        "30",
        "--misbehave",
        "hang",
        "--csv",
        &same,
        "--plot",
        &same,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("same file as another output"),
        "{}",
        stderr(&output)
    );
    // However it is spelled: through a link, or `dir/./name`.
    std::os::unix::fs::symlink("same.out", dir.path("link")).unwrap();
    let dotted = format!("{}/./same.out", dir.0.display());
    let output = vmm(&[
        "merge",
        "/nonexistent.json",
        "--junit",
        &dir.path("link"),
        "--markdown",
        &dotted,
    ]);
    assert!(
        stderr(&output).contains("same file as another output"),
        "{}",
        stderr(&output)
    );
    assert_eq!(dir.entries(), ["link"]);
}

#[test]
fn an_interrupted_run_leaves_no_temporary_file() {
    let Some(_vm) = vm_test() else { return };
    let dir = Scratch::new("interrupt");
    let csv = dir.path("samples.csv");
    std::fs::write(&csv, "the previous samples").unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "-n", "5000000", "--csv", &csv, "--plot", &dir.path("plot.svg")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    // SAFETY: a signal to our own child, by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), "the previous samples");
    assert_eq!(dir.entries(), ["samples.csv"], "no temporary file, no new output");
}

/// A report as `validate` writes it, by hand: one host, shard 1/2 of two cells × two
/// repeats (jobs 0 and 2), one run each.
fn report(host_cpu: &str, mode: &str, runs: &[(usize, u32)]) -> serde_json::Value {
    let run = |cell: usize, repeat: u32| {
        serde_json::json!({"cell": cell, "repeat": repeat, "host": 0, "truth": "virtual",
            "verdicts": [{"rule": "hypervisor-bit", "verdict": "virtual", "score": 1.0},
                         {"rule": "evil\u{1b}[2J|rule", "verdict": "virtual", "score": 1.0}],
            "cpuid_median": 1000, "nop_median": 50, "floor_median": 20, "lfence8_median": 40,
            "tsc_khz": 2_000_000, "cpuid_sketch": [1000]})
    };
    serde_json::json!({
        "schema_version": vmm::report::SCHEMA_VERSION,
        "config": "forged\u{1b}]0;title\u{7}.json",
        "matrix": {"description": "evil\n| desc |", "repeats": 2, "iterations": 10, "warmup": 0,
                   "modes": ["hw-assist"]},
        "payload": "p", "payload_digest": "d",
        "matrix_cells": [{"mode": mode, "shaping": "none", "busy": 0},
                         {"mode": "hw-assist", "shaping": "none", "busy": 0}],
        "hosts": [{"cpu_model": host_cpu, "microcode": null, "kernel": null, "kvm": "software",
                   "kvm_module": null, "nested": true, "tsc_khz": 2_000_000, "calibrated": false,
                   "shards": [{"index": 1, "count": 2}]}],
        "runs": runs.iter().map(|&(c, r)| run(c, r)).collect::<Vec<_>>(),
        "refusals": [], "failures": []
    })
}

#[test]
fn a_forged_report_is_refused_or_shown_escaped() {
    let dir = Scratch::new("forged");
    let write = |name: &str, value: &serde_json::Value| {
        let path = dir.path(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path
    };
    // Jobs 0 (cell 0, repeat 1) and 2 (cell 1, repeat 1) are shard 1/2's; job 1 is not.
    let outside = write("outside.json", &report("cpu", "hw-assist", &[(0, 0), (0, 1)]));
    let output = vmm(&["merge", &outside]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("outside.json") && stderr(&output).contains("not a job of the shards"),
        "{}",
        stderr(&output)
    );
    let hostile = write(
        "hostile.json",
        &report("Evil\u{1b}[31m | CPU\n| x |", "hw-assist\u{1b}x", &[(0, 0), (1, 0)]),
    );
    let markdown = dir.path("out.md");
    let plot = dir.path("out.svg");
    let output = vmm(&[
        "merge",
        &hostile,
        "--allow-partial",
        "--markdown",
        &markdown,
        "--plot",
        &plot,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'), "{text:?}");
    assert!(text.contains("\\u{1b}"), "{text}");
    let md = std::fs::read_to_string(&markdown).unwrap();
    assert!(!md.contains('\u{1b}'), "{md:?}");
    let host_row = md.lines().find(|l| l.starts_with("| 0 |")).unwrap();
    assert_eq!(
        host_row.replace("\\|", "").matches('|').count(),
        10,
        "the host row keeps its nine cells: {host_row}"
    );
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(!svg.contains('\u{1b}'), "the SVG is valid XML");
}

#[test]
fn an_interrupted_input_report_fails_the_merge_with_its_own_status() {
    let dir = Scratch::new("interrupted-input");
    let mut value = report("cpu", "hw-assist", &[(0, 0)]);
    value["interrupted"] = "interrupted by SIGINT after 1 of 2 jobs".into();
    value["interrupted_by"] = libc::SIGINT.into();
    let path = dir.path("partial.json");
    std::fs::write(&path, value.to_string()).unwrap();
    let out = dir.path("merged.json");
    let output = vmm(&["merge", &path, "--allow-partial", "-o", &out]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("an input report was interrupted") && stderr(&output).contains("partial.json"),
        "{}",
        stderr(&output)
    );
    let merged: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(merged["interrupted"].as_str().unwrap().contains("SIGINT"));
}

#[test]
fn a_merge_larger_than_its_bound_is_refused_before_reading() {
    let dir = Scratch::new("big");
    let big = dir.path("big.json");
    let file = std::fs::File::create(&big).unwrap();
    // Sparse: the size alone is what is checked.
    file.set_len(257 << 20).unwrap();
    let output = vmm(&["merge", &big]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("more than the 268435456"),
        "{}",
        stderr(&output)
    );
}
