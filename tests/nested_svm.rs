//! Tests for a KVM with hardware semantics: TSC moves honoured, debug traps not delivered.
//! `.ci/run` runs them inside `../shared/nested-svm/run` (kvm_amd on QEMU's emulated SVM):
//!
//! ```sh
//! ../shared/nested-svm/run target/release/deps/nested_svm-<hash> --ignored --test-threads=1
//! ```
//!
//! They are `#[ignore]`d in ordinary runs: this machine's software KVM ignores TSC moves
//! (`modes.rs` checks the refusal there). Exits under QEMU's TCG cost ~200,000 cycles and
//! vary by tens of thousands run to run, so tolerances follow the issue: hide within 10%
//! of the target or of the calibrated residue, virtual inject within 5%.

mod common;

use common::{json_run, vmm};

#[test]
#[ignore = "needs a KVM that honours TSC moves: run under ../shared/nested-svm/run (see .ci/run)"]
fn hide_brings_the_hypercall_cost_to_the_target() {
    // A target inside the range TCG's noise leaves usable: half the natural cost.
    let plain = json_run(&[
        "run", "--mode", "paravirt", "-n", "300", "--warmup", "10", "--probes", "cpuid", "--json",
    ]);
    let natural = plain["probes"]["cpuid"]["median"].as_u64().unwrap();
    let target = natural / 2;
    let report = json_run(&[
        "run",
        "--mode",
        "paravirt",
        "-n",
        "300",
        "--warmup",
        "10",
        "--probes",
        "cpuid",
        "--hide",
        "--target-cycles",
        &target.to_string(),
        "--json",
    ]);
    let shaping = &report["shaping"];
    assert_eq!(shaping["kind"], "hide");
    assert_eq!(shaping["tsc_method"], "vcpu-tsc-offset");
    let achieved = shaping["achieved_cycles"].as_i64().unwrap();
    let residue = shaping["residue_cycles"].as_u64().unwrap() as f64;
    let error = (achieved - target as i64).abs() as f64;
    assert!(
        error <= 0.1 * target as f64 || error <= 0.1 * residue,
        "target {target}, guest saw {achieved} (residue {residue}, natural {natural})"
    );
    assert!(achieved < natural as i64, "hiding made the exit look cheaper");
}

#[test]
#[ignore = "needs a KVM that honours TSC moves: run under ../shared/nested-svm/run (see .ci/run)"]
fn virtual_injection_adds_cycles_the_guest_sees_but_the_clock_does_not() {
    let n: i64 = 200_000;
    let report = json_run(&[
        "run",
        "--mode",
        "paravirt",
        "-n",
        "300",
        "--warmup",
        "10",
        "--probes",
        "cpuid",
        "--virtual-inject-cycles",
        &n.to_string(),
        "--json",
    ]);
    let shaping = &report["shaping"];
    let achieved = shaping["achieved_cycles"].as_i64().unwrap();
    assert!(
        (achieved - n).abs() as f64 <= 0.05 * n as f64,
        "asked {n}, the guest saw {achieved} more"
    );
    // Wall clock: the handler did not spend the injected cycles.
    let handler = report["exits"]["cpuid-hypercall"]["handler_cycles_median"]
        .as_i64()
        .unwrap();
    assert!(
        handler < n,
        "handler median {handler} cycles: the injection was spent, not virtual"
    );
}

#[test]
#[ignore = "needs a KVM where debug traps do not fire: run under ../shared/nested-svm/run (see .ci/run)"]
fn trap_emulate_is_refused_where_traps_are_not_delivered() {
    for trap in ["hw-breakpoint", "int3-patch"] {
        let output = vmm(&["run", "--mode", "trap-emulate", "--trap", trap, "-n", "20"]);
        assert_eq!(output.status.code(), Some(1), "{trap}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(
            message.contains("traps are not delivered by this KVM"),
            "{trap}: {message}"
        );
    }
}
