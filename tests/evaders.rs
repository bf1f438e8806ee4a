//! The evaders that trap RDTSC and answer it from a clock of their own (`--evade
//! rdtsc-trap|hide-exits|bettertiming|rdtsc-kvm-handler:N`, `docs/evaders.md`), on
//! whichever KVM runs the tests: the trap is a patched port I/O, delivered by every KVM,
//! and it works where TSC offset writes are ignored. Every timing check compares runs
//! made here and now, never absolute cycle counts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

mod common;

use common::{build_example, json_run, stderr, two_vcpus_test, verdict_of, vm_test, vmm};
use guest_payload::layout::PAYLOAD_START;
use serde_json::Value;
use vmm::vm::loader::test_support::tiny_elf;
use vmm::vm::loader::EM_X86_64;

const IO_PATCH: &[&str] = &["--mode", "trap-emulate", "--trap", "io-patch"];

fn run(evasion: &str, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--json", "-n", "300", "--warmup", "50", "--evade", evasion];
    args.extend_from_slice(extra);
    json_run(&args)
}

fn median(report: &Value, probe: &str) -> f64 {
    report["probes"][probe]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {probe} median in {}", report["probes"]))
}

/// What the trapped reads were told, checked for what holds of every clock here: each
/// site patched, every read answered, none backwards.
fn trapped(report: &Value) -> &Value {
    let record = &report["tsc_trap"];
    assert!(record["rdtsc_sites"].as_u64().unwrap() >= 4, "{record}");
    assert!(
        record["reads"].as_u64().unwrap() >= 2 * 300,
        "two reads per sample at least: {record}"
    );
    assert_eq!(record["backwards"], 0, "{record}");
    for (probe, summary) in report["probes"].as_object().unwrap() {
        assert_eq!(summary["backwards"], 0, "{probe}: {summary}");
    }
    record
}

#[test]
fn each_clock_is_what_its_original_computes() {
    let Some(_vm) = vm_test() else { return };
    let none = run("none", IO_PATCH);
    let trap = run("rdtsc-trap", IO_PATCH);
    let hide = run("hide-exits", IO_PATCH);
    let frozen = run("bettertiming", IO_PATCH);
    let slow = run("rdtsc-kvm-handler:20", IO_PATCH);
    assert!(none.get("tsc_trap").is_none(), "no evasion, no trap");
    assert_eq!(trap["config"]["evasion"], "rdtsc-trap");

    // Trapped and hiding nothing: the truth, each read an exit dearer.
    let record = trapped(&trap);
    assert_eq!(
        (record["max_behind"].as_u64(), record["max_ahead"].as_u64()),
        (Some(0), Some(0))
    );
    let (plain_rdtsc, trapped_rdtsc) = (median(&none, "rdtsc"), median(&trap, "rdtsc"));
    assert!(
        trapped_rdtsc >= 1.3 * plain_rdtsc,
        "rdtsc;rdtsc {plain_rdtsc} untrapped, {trapped_rdtsc} trapped"
    );

    // hide-exits: the exits are taken off the clock, which falls behind the truth.
    assert!(trapped(&hide)["max_behind"].as_u64().unwrap() > 0);
    for probe in ["rdtsc", "cpuid"] {
        let (shown, hidden) = (median(&trap, probe), median(&hide, probe));
        assert!(
            hidden <= 0.75 * shown,
            "{probe}: {shown} trapped, {hidden} with exits hidden"
        );
    }

    // BetterTiming's code hides the whole round trip of every tagged exit, the guest's own
    // time included: a guest whose exits are all tagged reads one TSC value throughout.
    trapped(&frozen);
    for (probe, summary) in frozen["probes"].as_object().unwrap() {
        assert_eq!(
            (summary["median"].as_i64(), summary["p95"].as_i64()),
            (Some(0), Some(0)),
            "{probe}: {summary}"
        );
    }

    // RDTSC-KVM-Handler: the real progress divided by 20.
    trapped(&slow);
    let ratio = median(&slow, "rdtsc") / trapped_rdtsc;
    assert!(
        (0.025..=0.125).contains(&ratio),
        "rdtsc;rdtsc at /20: {ratio:.3} of the truth"
    );
}

/// pafish's `cpu_rdtsc` (the SDK example: `rdtsc; rdtsc` ten times, VM unless 0 < mean <
/// 750) under the trap, on hw-assist: the RDTSC trap needs no CPUID path of the VMM's.
#[test]
fn pafish_cpu_rdtsc_sees_a_trap_that_does_not_hide_itself_and_a_clock_that_stands_still() {
    let Some(_vm) = vm_test() else { return };
    let elf = build_example("pafish-rdtsc");
    let mean = |evasion: &str| {
        let report = run(evasion, &["--mode", "hw-assist", "--payload", elf.to_str().unwrap()]);
        let verdict = verdict_of(&report, "payload").clone();
        assert!(
            verdict["why"].as_str().unwrap().contains("rdtsc;rdtsc mean of 10"),
            "{verdict}"
        );
        (verdict["score"].as_f64().unwrap(), verdict["verdict"].clone())
    };
    let (plain, _) = mean("none");
    let (trapped, _) = mean("rdtsc-trap");
    let (hidden, _) = mean("hide-exits");
    let (frozen, frozen_verdict) = mean("bettertiming");
    assert!(trapped >= 1.3 * plain, "mean {plain} untrapped, {trapped} trapped");
    assert!(hidden <= 0.75 * trapped, "mean {trapped} trapped, {hidden} hidden");
    assert_eq!(frozen, 0.0, "a clock that stands still");
    assert_eq!(frozen_verdict, "virtual", "pafish wants 0 < mean: zero is a VM");
}

/// A clock vCPU 0 answers for itself disagrees with the TSC the counter vCPU reads
/// untrapped: cross-vCPU checks see through every RDTSC trap (Ophion's report admits it).
#[test]
fn the_other_vcpus_tsc_sees_through_the_hidden_exits() {
    let Some(_vm) = two_vcpus_test() else { return };
    let mut args = vec!["--vcpus", "2"];
    args.extend_from_slice(IO_PATCH);
    let plain = run("none", &args);
    let hidden = run("hide-exits", &args);
    assert_eq!(verdict_of(&plain, "cross-vcpu-tsc")["verdict"], "native");
    let verdict = verdict_of(&hidden, "cross-vcpu-tsc");
    assert_eq!(verdict["verdict"], "virtual", "{verdict}");
}

#[test]
fn what_a_trap_cannot_do_is_refused_by_name() {
    let Some(_vm) = vm_test() else { return };
    let refused = |args: &[&str], words: &str| {
        let output = vmm(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(stderr(&output).contains(words), "{args:?}: {}", stderr(&output));
    };
    refused(
        &["run", "--mode", "native", "--evade", "rdtsc-trap", "-n", "10"],
        "a native run has no guest",
    );
    refused(
        &[
            "run",
            "--mode",
            "trap-emulate",
            "--trap",
            "io-patch",
            "--evade",
            "hide-exits",
            "--hide",
            "-n",
            "10",
        ],
        "give one or the other",
    );
    refused(
        &["run", "--evade", "rdtsc-kvm-handler:0", "-n", "10"],
        "between 1 and 1,000,000",
    );
    refused(
        &["run", "--evade", "rdtsc-kvm-handler", "-n", "10"],
        "rdtsc-kvm-handler:N",
    );
    // A payload with no RDTSC (one `hlt`) has nothing to trap.
    let path = std::env::temp_dir().join(format!("vmm-test-{}-no-rdtsc.elf", std::process::id()));
    std::fs::write(&path, tiny_elf(EM_X86_64, PAYLOAD_START, &[0xf4])).unwrap();
    refused(
        &[
            "run",
            "--mode",
            "hw-assist",
            "--evade",
            "rdtsc-trap",
            "--payload",
            path.to_str().unwrap(),
        ],
        "holds no RDTSC",
    );
    std::fs::remove_file(path).unwrap();
}
