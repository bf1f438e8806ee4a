//! The human-readable report of a run.

use super::RunReport;
use crate::modes::tsc_trap::TscTrapBy;
use std::fmt::Write;

/// Renders the report as aligned text tables.
pub fn render(report: &RunReport) -> String {
    let mut out = String::new();
    let host = &report.host;
    let _ = writeln!(
        out,
        "vmm {} — mode {}, payload {}",
        report.vmm_version, report.mode, report.payload.source
    );
    let _ = writeln!(
        out,
        "host: {} | KVM: {} | TSC {:.3} GHz ({}){}",
        host.cpu_model,
        host.kvm.flavour.describe(),
        f64::from(host.tsc_khz) / 1e6,
        host.tsc_khz_source.describe(),
        if host.host_is_vm {
            " | the host is itself a VM"
        } else {
            ""
        },
    );
    let asked = format!(
        "{} iterations after {} warm-up, CPUID leaf {:#x} subleaf {:#x}",
        report.config.iterations, report.config.warmup, report.config.cpuid_leaf, report.config.cpuid_subleaf
    );
    if report.payload.timing_core {
        let _ = writeln!(out, "{asked}\n");
    } else {
        let _ = writeln!(
            out,
            "offered {asked}; the payload ({}) measures what it measures (it does not declare VMM_CAP_TIMING_CORE)\n",
            report.payload.declared_name.as_deref().unwrap_or("declares nothing")
        );
    }

    let _ = writeln!(
        out,
        "{:<14} {:>8} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "probe", "count", "min", "p5", "median", "mean", "p95", "p99", "max"
    );
    for (name, probe) in &report.probes {
        let c = &probe.cycles;
        let _ = writeln!(
            out,
            "{name:<14} {:>8} {:>10} {:>10} {:>10} {:>12.1} {:>10} {:>10} {:>12}   cycles",
            c.count, c.min, c.p5, c.median, c.mean, c.p95, c.p99, c.max
        );
        let n = &probe.ns;
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>10.1} {:>10.1} {:>12.1}   ns",
            "", "", n.min, n.p5, n.median, n.mean, n.p95, n.p99, n.max
        );
    }
    for (name, probe) in &report.probes {
        let c = &probe.cycles;
        if c.backwards > 0 {
            let _ = writeln!(
                out,
                "\n{name}: {} of {} samples are negative (by up to {} cycles; real, not wrapped): \
                 the samples are inconsistent. {}",
                c.backwards,
                c.count,
                c.max_backwards_cycles,
                backwards_candidates(report)
            );
        }
    }
    if let Some(excess) = &report.cpuid_excess_over_nop {
        let _ = writeln!(
            out,
            "\nCPUID over NOP (medians): {:+} cycles, {:+.1} ns, {}",
            excess.median_cycles,
            excess.median_ns,
            excess
                .ratio
                .map_or("no ratio (a median is not positive)".to_owned(), |r| format!("×{r:.2}"))
        );
    }
    if let Some(trap) = &report.trap {
        let delivery = trap.delivery.map_or("not at all", |d| d.describe());
        let _ = writeln!(out, "\ntrap: {}, delivered {delivery}", trap.mechanism.name());
    }
    if !report.samples_to_decision.is_empty() {
        let _ = writeln!(
            out,
            "\nsamples to decision (resampled {} times a size; the fewest from which {:.0}% agree with the whole run):",
            crate::detector::decision::RESAMPLES,
            crate::detector::decision::AGREEMENT * 100.0
        );
        for d in &report.samples_to_decision {
            let needs = match d.samples {
                None if d.verdict == crate::detector::Verdict::Unsure => {
                    "unsure on the whole run: nothing to decide".to_owned()
                }
                Some(0) => "none: the same verdict without a sample".to_owned(),
                Some(n) => format!("{n} of {}", d.of),
                None => format!("more than the run's {}", d.of),
            };
            let _ = writeln!(out, "  {:<19} {needs}", d.rule);
        }
    }
    if let Some(t) = &report.tsc_trap {
        let _ = writeln!(
            out,
            "\nTSC reads trapped ({}): {} RDTSC and {} RDTSCP sites {}, {} reads answered; \
             the clock told was up to {} cycles behind and {} ahead of the guest's real TSC, \
             {} cycles off at the last read; {} reads went backwards",
            report.config.evasion,
            t.rdtsc_sites,
            t.rdtscp_sites,
            match t.by {
                TscTrapBy::IoPatch => "patched",
                TscTrapBy::HwBreakpoint => "trapped by breakpoints (code untouched)",
            },
            t.tsc.reads,
            t.tsc.max_behind,
            t.tsc.max_ahead,
            t.tsc.last_moved,
            t.tsc.backwards
        );
        for (clock, c) in t.clocks.read() {
            let _ = writeln!(
                out,
                "  {clock:<8} {} reads, up to {} behind and {} ahead, {} at the last, {} backwards",
                c.reads, c.max_behind, c.max_ahead, c.last_moved, c.backwards
            );
        }
        if t.armed > 0 {
            let _ = writeln!(
                out,
                "  armed after {} CPUID exits; {} of them undone by another exit before a read",
                t.armed, t.disarmed_unread
            );
        }
    }
    if let Some(shaping) = &report.shaping {
        let achieved = match (
            shaping.achieved_cycles,
            shaping.achieved_ns,
            shaping.achieved_p5_cycles,
            shaping.achieved_p95_cycles,
        ) {
            (Some(cycles), Some(ns), Some(p5), Some(p95)) => {
                format!("achieved median {cycles} cycles ({ns:.1} ns, p5 {p5}, p95 {p95})")
            }
            _ => {
                "achieved not measured (the payload reports no `cpuid` samples: its own figures are what the guest saw)"
                    .to_owned()
            }
        };
        let _ = writeln!(
            out,
            "shaping: {} — requested {} cycles ({:.1} ns), {achieved}; \
             baseline CPUID median {} (p95-p5 {}, embedded core){}",
            shaping.kind,
            shaping.requested_cycles,
            shaping.requested_ns,
            shaping.baseline_cycles,
            shaping.baseline_spread_cycles,
            match (shaping.residue_cycles, shaping.residue_lower_bound_cycles) {
                (Some(r), Some(lower)) => format!(", residue {r} (calibrated lower bound {lower})"),
                _ => String::new(),
            },
        );
        if let (Some(hidden), Some(fraction)) = (shaping.hidden_cycles_median, shaping.hidden_fraction) {
            let backwards = shaping.backwards_samples.map_or(
                "the payload reports no `cpuid` samples to check for backward steps".to_owned(),
                |b| format!("{b} samples ran backwards"),
            );
            let _ = writeln!(
                out,
                "hidden: {hidden} cycles per exit (median), {:.0}% of the unshaped cost; {backwards}",
                fraction * 100.0,
            );
        }
    }
    if let Some(counter) = &report.counter {
        let _ = writeln!(
            out,
            "\ncounter ticks      min     median       p95        max{}",
            match counter.cycles_per_tick {
                Some(rate) => format!("   (one tick = {rate:.1} TSC cycles in the rate window)"),
                None => String::new(),
            }
        );
        for (probe, ticks) in &counter.ticks {
            let _ = writeln!(
                out,
                "{probe:<16} {:>6} {:>10} {:>9} {:>10}",
                ticks.min, ticks.median, ticks.p95, ticks.max
            );
        }
        if let Some(vcpu) = &counter.vcpu {
            let _ = writeln!(
                out,
                "counter vCPU on host CPU {} (vCPU 0 on {}); paused {} times{}",
                vcpu.counter_cpu,
                vcpu.vcpu0_cpu,
                vcpu.pauses,
                if vcpu.shared_moves_wanted != 0 {
                    format!(
                        "; shared TSC moves {} of {} cycles applied (the vCPUs' TSCs now differ by {})",
                        vcpu.shared_moves_applied,
                        vcpu.shared_moves_wanted,
                        vcpu.shared_moves_applied - vcpu.shared_moves_wanted
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    if !report.exits.is_empty() {
        // As wide as the longest exit kind (cpuid-query-hypercall), so the columns line up.
        let width = report.exits.keys().map(|k| k.len()).max().unwrap_or(0).max(16);
        let _ = writeln!(
            out,
            "\n{:<width$} {:>10} {:>22}",
            "exits to the VMM", "count", "handler cycles (median)"
        );
        for (reason, exit) in &report.exits {
            let _ = writeln!(
                out,
                "{reason:<width$} {:>10} {:>22}",
                exit.count, exit.handler_cycles_median
            );
        }
    }
    if !report.verdicts.is_empty() {
        let _ = writeln!(out, "\n{:<19} {:<8} {:>8}  why", "detector rule", "verdict", "score");
        for v in &report.verdicts {
            let _ = writeln!(
                out,
                "{:<19} {:<8} {:>8.2}  {}",
                v.rule,
                v.verdict.name(),
                v.score,
                v.why
            );
        }
        for n in &report.not_applicable {
            let _ = writeln!(out, "{:<19} {:<8} {:>8}  {}", n.rule, "n/a", "", n.why);
        }
    }
    let timings = &report.timings;
    match timings.setup_us {
        Some(setup) => {
            let _ = writeln!(
                out,
                "\nsetup {setup} µs (VM creation to first KVM_RUN), run {} µs",
                timings.run_us
            );
        }
        None => {
            let cpu = report
                .native_cpu
                .map_or(String::new(), |cpu| format!(" on host CPU {cpu}"));
            let _ = writeln!(out, "\nrun {} µs{cpu}", timings.run_us);
        }
    }
    out
}

/// What can make a sample negative, as far as this run knows: the VMM names itself only
/// where it moved a clock, and never rules out the payload's own code.
fn backwards_candidates(report: &RunReport) -> String {
    const PAYLOAD: &str = "the payload's own code (an asm that writes a register it does not declare, \
                           such as a `cpuid` with no clobbers built with optimisation)";
    let moved = report.shaping.as_ref().and_then(|s| s.tsc_method.map(|_| s.kind));
    if report.mode == crate::modes::Mode::Native {
        return format!(
            "No hypervisor of this VMM ran: candidates are {PAYLOAD}, or reads on two CPUs whose TSCs differ"
        );
    }
    match (moved, report.config.evasion.as_str()) {
        (Some(kind), _) => format!("This run moved the guest's TSC ({kind} shaping): candidates are that move, or {PAYLOAD}"),
        (None, evasion) if evasion != "none" => {
            format!("This run's evasion ({evasion}) may move a clock: candidates are that evasion, or {PAYLOAD}")
        }
        _ => format!("This VMM moved no clock in this run: candidates are {PAYLOAD}, or the host's KVM adjusting the guest's TSC"),
    }
}
