//! `vmm trace`: one CPUID followed through every path this KVM offers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

mod common;

use common::{json_run, stderr, vm_test, vmm};
use serde_json::Value;

fn trace(path: &[&str]) -> Value {
    let report = json_run(&[&["trace", "--json"][..], path].concat());
    assert_eq!(report["paths"].as_array().map(Vec::len), Some(1), "{report}");
    report["paths"][0].clone()
}

fn cycles(part: &Value) -> i64 {
    part["cycles"].as_i64().unwrap()
}

/// The vendor string CPUID leaf 0 gives, from its EBX, EDX, ECX.
fn vendor(ebx: u64, ecx: u64, edx: u64) -> String {
    [ebx, edx, ecx]
        .iter()
        .flat_map(|r| (*r as u32).to_le_bytes())
        .map(char::from)
        .collect()
}

#[test]
fn every_path_is_traced_and_each_breakdown_adds_up() {
    let Some(_vm) = vm_test() else { return };
    // What KVM itself answers for leaf 0: the traps and the hypercall must answer the same.
    let reference = json_run(&["run", "--mode", "hw-assist", "-n", "1", "--warmup", "0", "--json"]);
    let leaf0 = reference["cpuid_snapshot"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["leaf"] == 0)
        .cloned()
        .unwrap();
    let kvm_vendor = vendor(
        leaf0["ebx"].as_u64().unwrap(),
        leaf0["ecx"].as_u64().unwrap(),
        leaf0["edx"].as_u64().unwrap(),
    );

    for path in [&["--mode", "native"][..], &["--mode", "hw-assist"]] {
        let life = trace(path);
        assert!(life["exit_reason"].is_null(), "{path:?}: no exit reaches the VMM");
        // No VMM answer to show, but what the guest got is there, from its own CPUIDs.
        assert!(life["registers_out"].is_null(), "{path:?}");
        let got = life["guest_got"].as_array().unwrap();
        let leaf0 = got
            .iter()
            .find(|r| r["leaf"] == 0)
            .expect("leaf 0 in what the guest got");
        assert_eq!(
            vendor(
                leaf0["ebx"].as_u64().unwrap(),
                leaf0["ecx"].as_u64().unwrap(),
                leaf0["edx"].as_u64().unwrap()
            ),
            kvm_vendor,
            "{path:?}"
        );
        let parts = life["breakdown"].as_array().unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(cycles(&parts[0]), life["guest_visible_cycles"].as_i64().unwrap());
    }

    for (path, reason, instruction) in [
        (
            &["--mode", "trap-emulate", "--trap", "hw-breakpoint"][..],
            "KVM_EXIT_DEBUG (#DB",
            "cpuid (0f a2)",
        ),
        (
            &["--mode", "trap-emulate", "--trap", "io-patch"],
            "KVM_EXIT_IO (out to port 0xf7",
            "out (e6 f7)",
        ),
        (&["--mode", "paravirt"], "KVM_EXIT_IO (out to port 0xf6", "out (ef)"),
        // An emulating KVM reports the patched int3 as an emulation failure, hardware
        // KVM as a #BP debug exit: either is KVM's own word, named as it said it.
        (
            &["--mode", "trap-emulate", "--trap", "int3-patch"],
            "KVM_EXIT_",
            "int3 (cc)",
        ),
    ] {
        if !common::path_runs_here(path) {
            let output = vmm(&[&["trace"][..], path].concat());
            assert_eq!(output.status.code(), Some(1), "{path:?}");
            assert!(stderr(&output).contains("not delivered by this KVM"), "{path:?}");
            continue;
        }
        let life = trace(path);
        let exit_reason = life["exit_reason"].as_str().unwrap_or_default();
        assert!(exit_reason.starts_with(reason), "{path:?}: {exit_reason}");
        let at = life["guest_instruction"].as_str().unwrap_or_default();
        assert!(at.starts_with(instruction), "{path:?}: {at}");

        let visible = life["guest_visible_cycles"].as_i64().unwrap();
        let [first, second] = [0, 1].map(|i| life["guest_timestamps"][i].as_u64().unwrap());
        assert_eq!(
            second - first,
            visible as u64,
            "{path:?}: the guest's timestamps are the sample"
        );
        let parts = life["breakdown"].as_array().unwrap();
        assert_eq!(parts.len(), 4, "{path:?}");
        assert_eq!(
            parts.iter().map(cycles).sum::<i64>(),
            visible,
            "{path:?}: the parts add up"
        );
        // Guest and host clocks agree: the stretch before the exit and after the re-entry
        // are not negative, beyond the uncertainty of the offset reading.
        let uncertainty = life["offset_uncertainty"].as_i64().unwrap();
        assert!(cycles(&parts[0]) >= -uncertainty, "{path:?}: {}", parts[0]);
        assert!(cycles(&parts[3]) >= -uncertainty, "{path:?}: {}", parts[3]);
        assert_eq!(cycles(&parts[2]), 0, "no shaping, no TSC move");
        // The VMM's steps are its whole stay in userspace, and each was measured.
        let steps: i64 = life["vmm_steps"].as_array().unwrap().iter().map(cycles).sum();
        assert_eq!(steps, cycles(&parts[1]), "{path:?}");
        assert!(
            life["vmm_steps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["what"].as_str().unwrap().starts_with("read the registers")),
            "{path:?}"
        );
        // Equivalence: the VMM answered what KVM answers.
        let out = &life["registers_out"];
        let answered = vendor(
            out[1].as_u64().unwrap(),
            out[2].as_u64().unwrap(),
            out[3].as_u64().unwrap(),
        );
        assert_eq!(answered, kvm_vendor, "{path:?}");
        assert!(life["other_exits"]["done-io"] == 1, "{path:?}: {}", life["other_exits"]);
    }
}

#[test]
fn all_paths_side_by_side_as_text_and_svg() {
    let Some(_vm) = vm_test() else { return };
    let svg = std::env::temp_dir().join(format!("vmm-trace-{}.svg", std::process::id()));
    let output = vmm(&["trace", "--all", "--svg", svg.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    for path in [
        "native",
        "hw-assist",
        "trap-emulate:hw-breakpoint",
        "trap-emulate:io-patch",
        "paravirt",
    ] {
        assert!(text.contains(&format!("== {path}:")), "{path}: {text}");
    }
    let drawn = std::fs::read_to_string(&svg).unwrap();
    std::fs::remove_file(&svg).ok();
    assert!(drawn.starts_with("<svg") && drawn.trim_end().ends_with("</svg>"));
    assert!(
        drawn.contains(">paravirt</text>") && drawn.contains(">native</text>"),
        "{drawn}"
    );
    // Shaping is done or refused for one path as `run` does or refuses it.
    let output = vmm(&["trace", "--mode", "paravirt", "--hide"]);
    if common::kvm_moves_tsc() {
        assert!(output.status.success(), "{}", stderr(&output));
    } else {
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(&output).contains("TSC moves are not honoured"),
            "{}",
            stderr(&output)
        );
    }
    // Shaping a path whose exits the VMM never sees is refused, not silently dropped; with
    // --all those paths say they ran unshaped.
    let output = vmm(&["trace", "--mode", "hw-assist", "--inject-ns", "1000"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let output = vmm(&["trace", "--all", "--inject-ns", "1000"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("Ran without the inject shaping asked"));
}

/// `trace --all` compares the answers the guest got on every path with the native one,
/// leaf by leaf, and names what differs: on a VM, leaf 1's hypervisor bit or topology
/// (resource control), never the vendor.
#[test]
fn trace_all_compares_every_paths_cpuid_answers_and_names_the_differences() {
    let Some(_vm) = vm_test() else { return };
    let output = vmm(&["trace", "--all"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let section = text
        .split("== CPUID answers the guest got, against native")
        .nth(1)
        .unwrap_or_else(|| panic!("no comparison: {text}"));
    assert!(
        section.contains("leaf 0x0.0") && section.contains("the same on every path"),
        "{section}"
    );
    let leaf1 = section.lines().find(|l| l.starts_with("leaf 0x1.0")).unwrap();
    // Natively the host's own CPU (itself a VM here, or bare metal); in a VM, KVM's table:
    // at least the APIC topology or a feature bit differs, and it is named.
    assert!(leaf1.contains("hw-assist") && leaf1.contains("bits 0x"), "{leaf1}");
    assert!(text.matches("guest  got ").count() >= 2, "{text}");
}
