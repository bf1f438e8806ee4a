//! Tests for a KVM with hardware semantics: TSC moves honoured, debug traps not delivered.
//! `.ci/run` runs them inside `../shared/nested-svm/run` (kvm_amd on QEMU's emulated SVM):
//!
//! ```sh
//! ../shared/nested-svm/run target/release/deps/nested_svm-<hash> --ignored --test-threads=1
//! ```
//!
//! They are `#[ignore]`d in ordinary runs: this machine's software KVM ignores TSC moves
//! (`modes.rs` checks the refusal there). Exits under QEMU's TCG cost ~200,000 cycles; on
//! the development host that cost drifts over seconds, and a VM now and then runs every
//! exit at about twice the cost — in a calibration VM (the guest then sees too little) or
//! in the shaped one (too much). So each test judges the median of seven runs, dropping
//! runs whose calibration moved by more than half while they ran. Tolerances follow the
//! issue: hide within 10% of the target or of the calibrated residue, virtual inject 5%.

mod common;

use common::{json_run, vmm};
use serde_json::Value;

const STEADY: f64 = 0.5;
/// Runs whose median is judged: VMs that fall into nested SVM's occasional slow mode
/// (exits twice as dear, docs/shaping.md) land on either side and cannot decide it.
const RUNS: usize = 7;
const ATTEMPTS: usize = 14;

/// [`RUNS`] runs of `args` whose calibration drifted less than [`STEADY`], each reduced
/// by `measure` to one number; returns the median of those numbers and the last report.
fn median_of_steady_runs(args: &[&str], measure: impl Fn(&Value) -> f64) -> (f64, Value) {
    let mut values = Vec::new();
    let mut drifts = Vec::new();
    for _ in 0..ATTEMPTS {
        let report = json_run(args);
        let drift = report["shaping"]["calibration_drift"]
            .as_f64()
            .expect("shaped runs report their drift");
        if drift < STEADY {
            values.push(measure(&report));
            if values.len() == RUNS {
                values.sort_by(f64::total_cmp);
                eprintln!("steady runs: {values:?}; unsteady drifts skipped: {drifts:?}");
                return (values[RUNS / 2], report);
            }
        } else {
            drifts.push(drift);
        }
    }
    panic!(
        "the host never held still: {} steady runs of {ATTEMPTS}, drifts {drifts:?}",
        values.len()
    );
}

#[test]
#[ignore = "needs a KVM that honours TSC moves: run under ../shared/nested-svm/run (see .ci/run)"]
fn hide_brings_the_hypercall_cost_to_the_target() {
    // A target inside the range TCG's noise leaves usable: half the natural cost.
    let plain = json_run(&[
        "run", "--mode", "paravirt", "-n", "300", "--warmup", "10", "--probes", "cpuid", "--json",
    ]);
    let natural = plain["probes"]["cpuid"]["median"].as_u64().unwrap();
    let target = natural / 2;
    let target_text = target.to_string();
    let args = [
        "run", "--mode", "paravirt", "-n", "300", "--warmup", "10", "--probes", "cpuid", "--hide",
    ];
    let args: Vec<&str> = args
        .into_iter()
        .chain(["--target-cycles", &target_text, "--json"])
        .collect();
    let (achieved, report) = median_of_steady_runs(&args, |r| r["shaping"]["achieved_cycles"].as_f64().unwrap());
    let shaping = &report["shaping"];
    assert_eq!(shaping["kind"], "hide");
    assert_eq!(shaping["tsc_method"], "vcpu-tsc-offset");
    let residue = shaping["residue_cycles"].as_f64().unwrap();
    let error = (achieved - target as f64).abs();
    assert!(
        error <= 0.1 * target as f64 || error <= 0.1 * residue,
        "target {target}, the guest saw {achieved} (median of steady runs; residue {residue}, natural {natural})"
    );
    assert!(achieved < natural as f64, "hiding made the exit look cheaper");
}

#[test]
#[ignore = "needs a KVM that honours TSC moves: run under ../shared/nested-svm/run (see .ci/run)"]
fn virtual_injection_adds_cycles_the_guest_sees_but_the_clock_does_not() {
    let n = 500_000.0;
    let args = [
        "run", "--mode", "paravirt", "-n", "300", "--warmup", "10", "--probes", "cpuid",
    ];
    let args: Vec<&str> = args
        .into_iter()
        .chain(["--virtual-inject-cycles", "500000", "--json"])
        .collect();
    let (achieved, report) = median_of_steady_runs(&args, |r| r["shaping"]["achieved_cycles"].as_f64().unwrap());
    assert!(
        (achieved - n).abs() <= 0.05 * n,
        "asked {n}, the guest saw {achieved} more (median of steady runs)"
    );
    // Wall clock: the handler did not spend the injected cycles.
    let handler = report["exits"]["cpuid-hypercall"]["handler_cycles_median"]
        .as_f64()
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
