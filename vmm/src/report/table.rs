//! The human-readable report of a run.

use super::RunReport;
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
        if host.is_vm { " | the host is itself a VM" } else { "" },
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
                "\n{name}: the guest's TSC ran BACKWARDS in {} of {} samples (by up to {} cycles): \
                 negative samples are real, not wrapped — a TSC moved back under the guest",
                c.backwards, c.count, c.max_backwards_cycles
            );
        }
    }
    if let Some(excess) = &report.cpuid_excess_over_nop {
        let _ = writeln!(
            out,
            "\nCPUID over NOP (medians): {:+} cycles, {:+.1} ns, ×{:.2}",
            excess.median_cycles, excess.median_ns, excess.ratio
        );
    }
    if let Some(trap) = &report.trap {
        let delivery = trap.delivery.map_or("not at all", |d| d.describe());
        let _ = writeln!(out, "\ntrap: {}, delivered {delivery}", trap.mechanism.name());
    }
    if let Some(shaping) = &report.shaping {
        let _ = writeln!(
            out,
            "shaping: {} — requested {} cycles ({:.1} ns), achieved median {} cycles ({:.1} ns, p5 {}, p95 {}); \
             baseline CPUID median {} (p95-p5 {}){}",
            shaping.kind,
            shaping.requested_cycles,
            shaping.requested_ns,
            shaping.achieved_cycles,
            shaping.achieved_ns,
            shaping.achieved_p5_cycles,
            shaping.achieved_p95_cycles,
            shaping.baseline_cycles,
            shaping.baseline_spread_cycles,
            match (shaping.residue_cycles, shaping.residue_lower_bound_cycles) {
                (Some(r), Some(lower)) => format!(", residue {r} (calibrated lower bound {lower})"),
                _ => String::new(),
            },
        );
        if let (Some(hidden), Some(fraction)) = (shaping.hidden_cycles_median, shaping.hidden_fraction) {
            let _ = writeln!(
                out,
                "hidden: {hidden} cycles per exit (median), {:.0}% of the unshaped cost; {} samples ran backwards",
                fraction * 100.0,
                shaping.backwards_samples
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
        let _ = writeln!(
            out,
            "\n{:<16} {:>10} {:>22}",
            "exits to the VMM", "count", "handler cycles (median)"
        );
        for (reason, exit) in &report.exits {
            let _ = writeln!(
                out,
                "{reason:<16} {:>10} {:>22}",
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
