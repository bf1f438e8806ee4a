//! The guest SDK end to end: a C payload built with `make` as a stock Linux box would, run
//! on every path, its CPUID sites found by decoding (it has no vmm_site_* symbols), and its
//! native twin run by `--mode native`.

mod common;

use common::{json_run, stderr, vm_test, vmm};
use std::path::PathBuf;

/// Builds an SDK example with make and returns the path of its guest ELF.
fn build_example(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-payload/examples")
        .join(name);
    let output = std::process::Command::new("make")
        .arg("-C")
        .arg(&dir)
        .output()
        .expect("make (installed by .ci/run with gcc)");
    assert!(
        output.status.success(),
        "make {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir.join(format!("{name}.elf"))
}

#[test]
fn a_c_payload_with_five_cpuids_and_no_symbols_is_trapped_at_every_site() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("five-cpuids");
    let payload = elf.to_str().unwrap();
    for trap in ["int3-patch", "io-patch"] {
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

/// pafish's CPUID check, reproduced with the SDK: its own verdict is reported beside the
/// built-in rules on every path, natively through its twin.
#[test]
fn the_pafish_reproduction_reports_its_verdict_on_every_path() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("pafish-rdtsc-vmexit");
    let payload = elf.to_str().unwrap();
    for mode in [
        &["--mode", "hw-assist"][..],
        &["--mode", "native"],
        &["--mode", "paravirt"],
        &["--mode", "trap-emulate", "--trap", "io-patch"],
        &["--mode", "trap-emulate", "--trap", "int3-patch"],
    ] {
        let mut args = vec!["run", "--payload", payload, "--json"];
        args.extend_from_slice(mode);
        let report = json_run(&args);
        let verdict = report["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["rule"] == "payload")
            .cloned()
            .unwrap_or_else(|| panic!("{mode:?}: no payload verdict"));
        assert!(
            verdict["why"].as_str().unwrap().contains("mean of 10"),
            "{mode:?}: {verdict}"
        );
        assert!(
            ["virtual", "native"].contains(&verdict["verdict"].as_str().unwrap()),
            "{mode:?}"
        );
        assert_eq!(report["probes"]["cpuid-unfenced"]["count"], 10, "{mode:?}");
    }
}
