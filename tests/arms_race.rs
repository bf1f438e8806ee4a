//! Two vCPUs on this machine's KVM: the counter vCPU, its clock, the evasions that act on
//! it and the rules that read it. (Hiding the TSC needs a KVM that honours TSC moves:
//! `nested_svm.rs` runs those under `SMP=2 ../shared/nested-svm/run`.) Every timing check
//! compares figures of runs made here and now, never absolute cycle counts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic here fails it, loudly

mod common;

use common::{json_run, kvm_scales_tsc, stderr, two_vcpus_test, verdict_of, vm_test, vmm};
use serde_json::Value;

const IO_PATCH: &[&str] = &["--mode", "trap-emulate", "--trap", "io-patch"];

fn two_vcpu_run(extra: &[&str]) -> Value {
    let mut args = vec!["run", "--json", "--vcpus", "2", "-n", "200", "--warmup", "10"];
    args.extend_from_slice(IO_PATCH);
    args.extend_from_slice(extra);
    common::json_run_past_kvm_faults(&args)
}

/// Under QEMU's TCG (nested SVM) the two vCPUs share the host's CPUs unevenly, and a run
/// whose counter vCPU was starved over the exits says nothing of the mechanism (its ticks
/// over CPUID read 0): there up to four pairs of runs are made and the first pair where
/// `shows` holds is judged. On this project's KVM, one pair.
fn pair_where_the_counter_ran(
    make: impl Fn() -> (Value, Value),
    shows: impl Fn(&Value, &Value) -> bool,
) -> (Value, Value) {
    let tries = if common::kvm_moves_tsc() { 4 } else { 1 };
    let mut pair = make();
    for _ in 1..tries {
        if shows(&pair.0, &pair.1) {
            break;
        }
        pair = make();
    }
    pair
}

fn median_ticks(report: &Value, probe: &str) -> f64 {
    report["counter"]["ticks"][probe]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {probe} ticks in {}", report["counter"]))
}

/// The counter vCPU runs on while vCPU 0 is in the VMM's exit handler: an injected spin of
/// 200 µs there shows up in the ticks over each trapped CPUID, and in TIMER's ratio.
#[test]
fn the_counter_advances_while_vcpu0_is_in_the_exit_handler() {
    let Some(_vm) = two_vcpus_test() else { return };
    let spin = |plain: &Value| {
        0.2e-3 * plain["host"]["tsc_khz"].as_f64().unwrap() * 1e3
            / plain["counter"]["cycles_per_tick"].as_f64().unwrap()
    };
    let (plain, injected) = pair_where_the_counter_ran(
        || (two_vcpu_run(&[]), two_vcpu_run(&["--inject-ns", "200000"])),
        |plain, injected| {
            median_ticks(injected, "cpuid") - median_ticks(plain, "cpuid") >= spin(plain) / 2.0
                && median_ticks(injected, "timer-cpuid") > 2.0 * median_ticks(plain, "timer-cpuid")
        },
    );
    for report in [&plain, &injected] {
        assert_eq!(report["config"]["vcpus"], 2);
        let vcpu = &report["counter"]["vcpu"];
        assert_ne!(vcpu["counter_cpu"], vcpu["vcpu0_cpu"], "{vcpu}");
        assert_eq!(vcpu["pauses"], 0);
    }
    let (before, after) = (median_ticks(&plain, "cpuid"), median_ticks(&injected, "cpuid"));
    // 200 µs is ~490,000 TSC cycles here: at least half of that must be in the ticks.
    let spin_ticks = spin(&plain);
    assert!(
        after - before >= spin_ticks / 2.0,
        "ticks over CPUID {before} -> {after} with a spin worth {spin_ticks:.0} ticks"
    );
    assert!(median_ticks(&injected, "timer-cpuid") > 2.0 * median_ticks(&plain, "timer-cpuid"));
    // The counter agrees with the TSC over the spin: nothing was hidden or paused. (Under
    // QEMU's TCG the counter vCPU's thread competes with vCPU 0's for the host's CPUs, so
    // its rate over one exit is not steady enough for these rules: asserted on this
    // project's KVM, where the ticks above are the mechanism's proof elsewhere.)
    if !common::kvm_moves_tsc() {
        assert_eq!(verdict_of(&injected, "counter-tsc")["verdict"], "native");
        assert_eq!(verdict_of(&injected, "counter-stall")["verdict"], "native");
    }
    // TIMER judges where it has enough pairs in its windows; under QEMU's TCG (nested
    // SVM) two vCPUs run too unevenly for that and it says "unsure", saying why.
    let timer = verdict_of(&injected, "vmaware-timer-2.7");
    assert!(timer["verdict"] == "virtual" || timer["verdict"] == "unsure", "{timer}");
    if !common::kvm_moves_tsc() {
        // This project's software KVM: TIMER judges, and sees the spin.
        assert_eq!(timer["verdict"], "virtual", "{timer}");
    }
}

/// `--evade pause-counter` stops the counter for the length of each exit, as an evader's
/// IPIs stop a detector's counter thread: over the same spin the counter barely moves,
/// TIMER's ratio collapses, and the stalled-counter rule sees the TSC run on without it.
#[test]
fn pausing_the_counter_fools_timer_and_the_stall_rule_catches_it() {
    let Some(_vm) = two_vcpus_test() else { return };
    let (running, paused) = pair_where_the_counter_ran(
        || {
            (
                two_vcpu_run(&["--inject-ns", "200000"]),
                two_vcpu_run(&["--inject-ns", "200000", "--evade", "pause-counter"]),
            )
        },
        |running, paused| median_ticks(paused, "cpuid") * 2.0 < median_ticks(running, "cpuid"),
    );
    assert_eq!(paused["config"]["evasion"], "pause-counter");
    // One pause per exit the VMM handled, the done port aside.
    let exits: u64 = paused["exits"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(kind, _)| *kind != "done-io")
        .map(|(_, e)| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(paused["counter"]["vcpu"]["pauses"].as_u64(), Some(exits));
    assert!(
        median_ticks(&paused, "cpuid") * 2.0 < median_ticks(&running, "cpuid"),
        "paused {} running {}",
        paused["counter"]["ticks"]["cpuid"],
        running["counter"]["ticks"]["cpuid"]
    );
    let ratio = |r: &Value| verdict_of(r, "vmaware-timer-2.7")["score"].as_f64().unwrap();
    // Where TIMER judges the running counter at all (see above), pausing collapses it.
    if verdict_of(&running, "vmaware-timer-2.7")["verdict"] != "unsure" || !common::kvm_moves_tsc() {
        assert!(
            ratio(&paused) * 2.0 < ratio(&running),
            "TIMER {} -> {}",
            ratio(&running),
            ratio(&paused)
        );
    }
    assert_eq!(
        verdict_of(&paused, "counter-stall")["verdict"],
        "virtual",
        "{}",
        verdict_of(&paused, "counter-stall")
    );
    assert_eq!(verdict_of(&running, "counter-stall")["verdict"], "native");
    // The TSC still shows the spin: the TSC rules are not fooled by pausing.
    assert_eq!(verdict_of(&paused, "fixed-threshold")["verdict"], "virtual");
}

/// Natively the counter is a host thread on another CPU, running the very loop the
/// counter vCPU runs; one host's TSC never reads behind another CPU's stamp.
#[test]
fn a_native_run_with_a_counter_thread_reports_ticks_and_a_coherent_tsc() {
    let Some(_vm) = two_vcpus_test() else { return };
    let report = json_run(&["run", "--json", "--mode", "native", "--vcpus", "2", "-n", "2000"]);
    for probe in ["cpuid", "nop", "timer-cpuid", "timer-lfence8", "cross-tsc"] {
        assert!(median_ticks(&report, probe) >= 0.0);
    }
    assert!(report["counter"]["cycles_per_tick"].as_f64().unwrap() > 0.0);
    assert!(report["counter"].get("vcpu").is_none(), "no counter vCPU natively");
    assert_eq!(report["probes"]["cross-tsc"]["backwards"], 0);
    assert_eq!(verdict_of(&report, "cross-vcpu-tsc")["verdict"], "native");
    for rule in [
        "vmaware-timer-2.7",
        "vmaware-timer-main",
        "counter-tsc",
        "counter-stall",
    ] {
        assert!(verdict_of(&report, rule)["why"].as_str().is_some(), "{rule}");
    }
}

/// What a user types that cannot work is refused, saying why, before anything runs.
#[test]
fn evasions_and_counter_probes_are_refused_where_they_cannot_act() {
    let Some(_vm) = two_vcpus_test() else { return };
    let refused = |args: &[&str], expected: &str| {
        let output = vmm(args);
        assert!(!output.status.success(), "{args:?} ran");
        let message = stderr(&output);
        assert!(message.contains(expected), "{args:?}: {message}");
    };
    refused(
        &["run", "--evade", "pause-counter", "--mode", "paravirt"],
        "add --vcpus 2",
    );
    refused(
        &["run", "--vcpus", "2", "--evade", "pause-counter"],
        "--mode trap-emulate or --mode paravirt",
    );
    refused(&["run", "--probes", "timer-cpuid"], "add --vcpus 2");
    refused(
        &["run", "--vcpus", "2", "--mode", "paravirt", "--evade", "shared-offset"],
        "makes none: add --hide, --virtual-inject-cycles or --profile",
    );
    refused(&["run", "--evade", "teleport"], "unknown evasion");
    refused(&["run", "--evade", "tsc-khz:5"], "between 100,000 and 10,000,000");
    refused(&["run", "--vcpus", "3"], "--vcpus");
    // TSC scaling as doctor probed it: refused by name where KVM lacks it (this KVM and
    // nested SVM), run where it has it.
    let args = [
        "run",
        "--mode",
        "paravirt",
        "--vcpus",
        "2",
        "--evade",
        "tsc-khz:1000000",
        "-n",
        "50",
    ];
    if kvm_scales_tsc() {
        let output = vmm(&args);
        assert!(output.status.success(), "{}", stderr(&output));
    } else {
        refused(&args, "KVM_CAP_TSC_CONTROL");
    }
}

/// One vCPU, as before: no counter, no counter rules, no counter section.
#[test]
fn a_single_vcpu_run_has_no_counter_and_no_counter_rules() {
    let Some(_vm) = vm_test() else { return };
    let report = json_run(&["run", "--json", "-n", "100", "--warmup", "5"]);
    assert!(report.get("counter").is_none());
    assert_eq!(report["config"]["vcpus"], 1);
    let rules: Vec<&str> = report["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["rule"].as_str().unwrap())
        .collect();
    assert!(
        !rules
            .iter()
            .any(|r| r.starts_with("vmaware") || r.starts_with("counter")),
        "{rules:?}"
    );
}

/// A guest that overwrites its counter vCPU's loop with `ud2`: the counter's catch-all
/// IDT turns the fault into a report naming the exception and where it struck, where
/// without one the counter would triple-fault and (on SVM) leave no registers to read.
#[test]
fn a_counter_vcpu_that_faults_is_reported_with_its_exception_and_rip() {
    let Some(_vm) = two_vcpus_test() else { return };
    use vmm::vm::loader::{test_support::tiny_elf, EM_X86_64};
    #[rustfmt::skip]
    let code = [
        0x66, 0xc7, 0x04, 0x25, 0x00, 0x70, 0x00, 0x00, 0x0f, 0x0b, // mov word [0x7000], ud2
        0x41, 0xb8, 0xe8, 0x03, 0x00, 0x00,                         // mov r8d, 1000
        0x31, 0xc0, 0x31, 0xc9, 0x0f, 0xa2,                         // 1: xor eax, eax; xor ecx, ecx; cpuid
        0x41, 0xff, 0xc8, 0x75, 0xf5,                               // dec r8d; jnz 1b
        0x31, 0xc0, 0xe7, 0xf4, 0xf4,                               // out DONE, 0 (ok); hlt
    ];
    assert_eq!(guest_payload::layout::COUNTER_CODE_ADDR, 0x7000);
    let dir = std::env::temp_dir().join(format!("vmm-test-{}-breaker", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = dir.join("breaker.elf");
    std::fs::write(
        &payload,
        tiny_elf(EM_X86_64, guest_payload::layout::PAYLOAD_START, &code),
    )
    .unwrap();
    let output = vmm(&["run", "--vcpus", "2", "--evade", "pause-counter"]
        .into_iter()
        .chain(IO_PATCH.iter().copied())
        .chain(["--timeout", "30", "--payload", payload.to_str().unwrap()])
        .collect::<Vec<_>>());
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    let code_addr = format!("RIP {:#x}", guest_payload::layout::COUNTER_CODE_ADDR);
    assert!(
        message.contains("counter vCPU") && message.contains("#UD (vector 6)") && message.contains(&code_addr),
        "{message}"
    );
    assert!(!message.contains("triple fault"), "{message}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A guest that stops its own counter vCPU (writes STOP to the counter block) under an
/// evasion that pauses the counter at every exit: the run fails at once, naming the
/// counter, not after the whole --timeout of kicks nobody acknowledges; and a guest that
/// hangs under the same evasion is reported as a hang.
#[test]
fn a_pausing_run_whose_guest_stops_the_counter_fails_at_once_naming_it() {
    let Some(_vm) = two_vcpus_test() else { return };
    let (dir, payload) = common::build_c_payload(
        "stopper",
        r#"#include "vmm_sdk.h"
VMM_PAYLOAD("stops its counter", VMM_CAP_COUNTER);
int vmm_detect(struct vmm_run *run) {
    volatile struct vmm_counter_block *block = (volatile struct vmm_counter_block *)(uintptr_t)run->config->counter_addr;
    if (block)
        block->stamp_request = VMM_COUNTER_STOP;
    for (int i = 0; i < 1000; i++) {
        uint32_t a = 0, b, c = 0, d;
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    }
    return VMM_STATUS_OK;
}
"#,
    );
    let started = std::time::Instant::now();
    // io-patch, two vCPUs, the counter paused at every exit.
    let pausing = ["run", "--vcpus", "2", "--evade", "pause-counter"]
        .into_iter()
        .chain(IO_PATCH.iter().copied());
    let output = vmm(&pausing
        .clone()
        .chain(["--timeout", "30", "--payload", payload.to_str().unwrap()])
        .collect::<Vec<_>>());
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("counter vCPU"), "{message}");
    assert!(
        !message.contains("did not pause before the run's deadline"),
        "{message}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}: {message}");

    let hung = vmm(&pausing
        .chain(["--timeout", "2", "--misbehave", "hang"])
        .collect::<Vec<_>>());
    assert_eq!(hung.status.code(), Some(1));
    assert!(stderr(&hung).contains("the guest hung"), "{}", stderr(&hung));
    std::fs::remove_dir_all(&dir).ok();
}
