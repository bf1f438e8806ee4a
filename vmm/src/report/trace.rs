//! What `vmm trace` shows: the life of one CPUID, step by step, on each path — the guest instruction
//! at its RIP, the exit as KVM reported it, every call the VMM made on the vCPU and what it
//! cost, the emulation (leaf in, registers out), shaping, the re-entry, and what the
//! guest's two timestamps read — with a breakdown that adds up to the guest-visible cost.
//!
//! The run is the embedded timing core measuring one CPUID sample after `--warmup`
//! warm-ups; the exit traced is that sample's. Host TSC times become guest TSC times
//! through the guest's TSC offset, read (IA32_TSC, between two host reads) after the run,
//! less the TSC moves the run made since the traced exit.

//!
//! Worked out from a run's [`Recorder`] (the typed exits, the calls the handler made on
//! the vCPU, the guest's registers), then rendered as text and as an SVG.

use crate::measure::RunSpec;
use crate::modes::Path;
use crate::shaping::latency::Shaping;
use crate::vm::exit::Exit;
use crate::vm::handler::ExitKind;
use crate::vm::trace::{Recorder, TracedExit};
use crate::vm::vcpu::RegisterAccess;
use guest_payload::timing::FIRST_TIMESTAMP_REGISTER;
use guest_payload::CpuidRecord;
use kvm_bindings::kvm_regs;
use serde::Serialize;
use std::fmt::Write as _;

/// One thing that happened, and what it cost (cycles of the host TSC).
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub what: String,
    pub cycles: u64,
}

/// One part of the guest-visible cost.
#[derive(Clone, Debug, Serialize)]
pub struct Part {
    pub what: String,
    /// Guest TSC cycles (signed: a part is measured, and the measurement has an error).
    pub cycles: i64,
}

/// One CPUID's life on one path.
#[derive(Clone, Debug, Serialize)]
pub struct CpuidLife {
    pub path: String,
    pub leaf: u32,
    pub subleaf: u32,
    /// The guest's cost for this CPUID, `lfence; rdtsc; <cpuid>; lfence; rdtsc` (cycles).
    pub guest_visible_cycles: i64,
    /// How many traces this one is the median of (`--repeat`), and their least and
    /// greatest guest-visible cost.
    pub traces: u32,
    pub guest_visible_range: (i64, i64),
    /// What the guest's two timestamps read (guest TSC), where an exit let the VMM see
    /// the first one (in the guest's r8).
    pub guest_timestamps: Option<[u64; 2]>,
    /// The guest instruction at the RIP of the exit, and its address.
    pub guest_instruction: Option<String>,
    pub rip: Option<u64>,
    /// The exit as KVM reported it; `None` where no exit reached the VMM.
    pub exit_reason: Option<String>,
    /// EAX–EDX the VMM answered (the paths where the VMM handles CPUID).
    pub registers_out: Option<[u32; 4]>,
    /// What the guest's own CPUIDs returned on this path, every path natively included:
    /// the timing core's snapshot of a fixed set of leaves (`CPUID_SNAPSHOT_LEAVES`).
    pub guest_got: Vec<CpuidRecord>,
    /// The VMM's steps between KVM_RUN returning and KVM_RUN entered again.
    pub vmm_steps: Vec<Step>,
    /// Parts that add up to `guest_visible_cycles`.
    pub breakdown: Vec<Part>,
    /// How far the host→guest time conversion may be off, each way (guest TSC cycles).
    pub offset_uncertainty: Option<u64>,
    /// Every other exit of the run, by kind (console bytes, warm-up CPUIDs, done).
    pub other_exits: std::collections::BTreeMap<&'static str, usize>,
    pub note: String,
}

/// The instruction that exited: at RIP, except for port I/O, which KVM reports with RIP
/// already past the `out` (`e6 ib`, two bytes, or `ee`/`ef`, one).
fn guest_instruction(exit: &TracedExit, rip: u64) -> (u64, Option<String>) {
    use crate::arch::x86_64::decode::describe;
    let at = |addr: u64| {
        let offset = usize::try_from(addr.checked_sub(exit.code_addr)?).ok()?;
        describe(exit.code.get(offset..)?, addr)
    };
    if matches!(exit.exit, Exit::IoOut { .. } | Exit::IoIn { .. }) {
        for len in [2, 1] {
            let addr = rip.saturating_sub(len);
            if let Some(text) = at(addr).filter(|t| t.starts_with("out ") && t.len() > 4) {
                return (addr, Some(format!("{text}; KVM reports RIP {rip:#x}, past it")));
            }
        }
    }
    (rip, at(rip))
}

fn is_timed_cpuid(exit: &TracedExit) -> bool {
    matches!(exit.kind, Some(ExitKind::CpuidTrap | ExitKind::CpuidHypercall))
}

/// The guest's first timestamp, which the probes keep in [`FIRST_TIMESTAMP_REGISTER`]
/// while the probed instruction runs.
fn first_timestamp(regs: &kvm_regs) -> u64 {
    match FIRST_TIMESTAMP_REGISTER {
        "r9" => regs.r9,
        "r10" => regs.r10,
        "r11" => regs.r11,
        _ => regs.r8,
    }
}

pub fn life(path: Path, spec: &RunSpec, sample: i64, recorder: &Recorder, access: Option<RegisterAccess>) -> CpuidLife {
    let mut other_exits = std::collections::BTreeMap::new();
    let traced = recorder.exits.iter().rposition(is_timed_cpuid);
    for (i, exit) in recorder.exits.iter().enumerate() {
        if Some(i) != traced {
            *other_exits
                .entry(exit.kind.map_or("fatal", ExitKind::name))
                .or_insert(0) += 1;
        }
    }
    let mut life = CpuidLife {
        path: path.name().to_owned(),
        leaf: spec.cpuid_leaf,
        subleaf: spec.cpuid_subleaf,
        guest_visible_cycles: sample,
        traces: 1,
        guest_visible_range: (sample, sample),
        guest_timestamps: None,
        guest_instruction: None,
        rip: None,
        exit_reason: None,
        registers_out: None,
        guest_got: Vec::new(),
        vmm_steps: Vec::new(),
        breakdown: Vec::new(),
        offset_uncertainty: None,
        other_exits,
        note: String::new(),
    };
    let (Some(index), Some(next)) = (traced, traced.and_then(|i| recorder.exits.get(i + 1))) else {
        let (what, note) = match path {
            Path::Native => (
                "on the host CPU: the instruction runs natively and nothing exits to a VMM",
                "natively, the CPU executes CPUID itself: no exit, no VMM, no KVM. On a host that is itself a VM, \
                 its own hypervisor takes the exit, invisibly from inside.",
            ),
            _ => (
                "inside one KVM_RUN: the VM exit, KVM's in-kernel emulation of CPUID from its table, the VM entry, and the guest's own instructions",
                "KVM answers CPUID in the kernel (hardware-assisted path): KVM_RUN does not return for it, so the VMM sees nothing of it; \
                 only the guest's two timestamps tell its cost.",
            ),
        };
        life.breakdown.push(Part {
            what: what.into(),
            cycles: sample,
        });
        life.note = note.into();
        return life;
    };
    let exit = &recorder.exits[index];
    let moved: i64 = exit.tsc_moves.iter().sum();
    let moved_since: i64 = recorder.exits[index..].iter().flat_map(|e| e.tsc_moves.iter()).sum();
    life.exit_reason = Some(exit.exit.kvm_name());
    if let Some(regs) = exit.regs_in {
        let (rip, instruction) = guest_instruction(exit, regs.rip);
        life.rip = Some(rip);
        life.guest_instruction = instruction;
    }
    life.registers_out = exit
        .regs_out
        .map(|r| [r.rax as u32, r.rbx as u32, r.rcx as u32, r.rdx as u32]);
    life.vmm_steps = vmm_steps(exit, next.entered, access, spec);
    let vmm_cycles = next.entered.saturating_sub(exit.exited) as i64;
    match (exit.regs_in, recorder.offset_after) {
        (Some(regs), Some((offset_after, uncertainty))) => {
            // The offset while the sample ran, before this exit's move.
            let offset = offset_after.wrapping_sub(moved_since);
            let first = first_timestamp(&regs);
            let second = first.wrapping_add(sample as u64);
            let to_guest = |host: u64| host.wrapping_add(offset as u64);
            let before = to_guest(exit.exited).wrapping_sub(first) as i64;
            let after = second.wrapping_sub(to_guest(next.entered).wrapping_add(moved as u64)) as i64;
            life.guest_timestamps = Some([first, second]);
            life.offset_uncertainty = Some(uncertainty);
            life.breakdown = vec![
                Part {
                    what: "the guest's first timestamp → the VM exit → KVM_RUN returned (the guest's instructions to the trap, the exit, KVM's exit path to userspace)".into(),
                    cycles: before,
                },
                Part {
                    what: "in the VMM, KVM_RUN returned → KVM_RUN entered (the steps above)".into(),
                    cycles: vmm_cycles,
                },
                Part {
                    what: "the guest TSC moved by shaping".into(),
                    cycles: moved,
                },
                Part {
                    what: "KVM_RUN entered → the guest's second timestamp (KVM's entry path, the VM entry, lfence; rdtsc)".into(),
                    cycles: after,
                },
            ];
        }
        _ => {
            life.breakdown = vec![
                Part {
                    what: "in the VMM, KVM_RUN returned → KVM_RUN entered".into(),
                    cycles: vmm_cycles,
                },
                Part {
                    what: "the rest: the guest, the exit and the entry (the guest's TSC offset could not be read)"
                        .into(),
                    cycles: sample - vmm_cycles - moved,
                },
            ];
        }
    }
    life.note = match path {
        Path::Paravirt => "the enlightened guest does not execute CPUID: it asks the VMM with an `out` to the hypercall port, and the VMM answers in RAX–RDX.".into(),
        Path::TrapEmulate(trap) => format!("trap-emulate ({}): the CPUID traps to this VMM, which emulates it from the CPUID table KVM holds.", trap.name()),
        _ => String::new(),
    };
    life
}

/// The VMM's steps: each call on the vCPU, the handler's own work between them, the
/// write-back and the way back to KVM_RUN. They add up to the whole stay in userspace.
fn vmm_steps(exit: &TracedExit, reentered: u64, access: Option<RegisterAccess>, spec: &RunSpec) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut at = exit.exited;
    let mut wrote = false;
    for call in &exit.calls {
        let gap_what = if wrote {
            "the handler's own work (shaping: planning, and any injected spin)"
        } else if at == exit.exited {
            "dispatch the exit to the mode's handler"
        } else {
            "the handler's own work: emulate CPUID (look up leaf and subleaf in the table, as KVM would)"
        };
        steps.push(Step {
            what: gap_what.into(),
            cycles: call.start.saturating_sub(at),
        });
        let what = match (call.what.as_str(), access) {
            ("read the registers", Some(RegisterAccess::SyncRegs)) => {
                "read the registers from kvm_run (KVM_CAP_SYNC_REGS: no ioctl)".to_owned()
            }
            ("read the registers", _) => "read the registers (KVM_GET_REGS)".to_owned(),
            ("write the registers", Some(RegisterAccess::SyncRegs)) => {
                "write the registers into kvm_run, marked dirty (they travel with KVM_RUN)".to_owned()
            }
            ("write the registers", _) => "write the registers (kept for KVM_SET_REGS before re-entry)".to_owned(),
            (other, _) => other.to_owned(),
        };
        wrote |= call.what == "write the registers";
        steps.push(Step {
            what,
            cycles: call.end.saturating_sub(call.start),
        });
        at = call.end;
    }
    let handler_end = exit.handled.saturating_sub(exit.flush_cycles);
    steps.push(Step {
        what: if spec.shaping == Shaping::None {
            "the handler returns".into()
        } else {
            format!(
                "the handler's own work, then it returns ({} shaping)",
                spec.shaping.kind()
            )
        },
        cycles: handler_end.saturating_sub(at),
    });
    steps.push(Step {
        what: match access {
            Some(RegisterAccess::Ioctls) => "write the registers back (KVM_SET_REGS)".into(),
            _ => "write-back: none needed (sync regs)".into(),
        },
        cycles: exit.flush_cycles,
    });
    steps.push(Step {
        what: "count the exit, check the watchdog, back to KVM_RUN".into(),
        cycles: reentered.saturating_sub(exit.handled),
    });
    steps
}

pub fn render(lives: &[CpuidLife], refused: &[(String, String)], host: &crate::host::HostInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "the life of one CPUID — host: {} | KVM: {}{}\n",
        host.cpu_model,
        host.kvm.flavour.describe(),
        if host.host_is_vm {
            " | the host is itself a VM"
        } else {
            ""
        }
    );
    for life in lives {
        let _ = writeln!(
            out,
            "== {}: CPUID leaf {:#x} subleaf {:#x}",
            life.path, life.leaf, life.subleaf
        );
        if life.traces > 1 {
            let _ = writeln!(
                out,
                "the median of {} traces (guest-visible {}..{} cycles), each a fresh run",
                life.traces, life.guest_visible_range.0, life.guest_visible_range.1
            );
        }
        if let (Some(rip), Some(instruction)) = (life.rip, &life.guest_instruction) {
            let _ = writeln!(out, "guest  {rip:#010x}  {instruction}");
        }
        if let Some([first, _]) = life.guest_timestamps {
            let _ = writeln!(out, "guest  first timestamp (lfence; rdtsc, kept in r8): {first}");
        }
        match &life.exit_reason {
            Some(reason) => {
                let _ = writeln!(out, "exit   {reason}");
            }
            None => {
                let _ = writeln!(out, "exit   none reached the VMM");
            }
        }
        for step in &life.vmm_steps {
            let _ = writeln!(out, "vmm    {:>9}  {}", step.cycles, step.what);
        }
        if let Some(regs) = life.registers_out {
            let _ = writeln!(
                out,
                "vmm    answered eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
                regs[0], regs[1], regs[2], regs[3]
            );
        }
        match life
            .guest_got
            .iter()
            .find(|r| (r.leaf, r.subleaf) == (life.leaf, life.subleaf))
        {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "guest  got      eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
                    r.eax, r.ebx, r.ecx, r.edx
                );
            }
            None if !life.guest_got.is_empty() => {
                let _ = writeln!(
                    out,
                    "guest  got      (leaf {:#x} is not in the snapshot: see the comparison below)",
                    life.leaf
                );
            }
            None => {}
        }
        if let Some([_, second]) = life.guest_timestamps {
            let _ = writeln!(out, "guest  second timestamp: {second}");
        }
        let _ = writeln!(out, "\n       cycles  guest-visible {} =", life.guest_visible_cycles);
        for part in &life.breakdown {
            let _ = writeln!(out, "    {:>9}  {}", part.cycles, part.what);
        }
        let total: i64 = life.breakdown.iter().map(|p| p.cycles).sum();
        let _ = write!(out, "    {total:>9}  total");
        match life.offset_uncertainty {
            Some(0) => {
                let _ = write!(
                    out,
                    " (host times made guest times with the vCPU's TSC offset, checked against IA32_TSC)"
                );
            }
            Some(uncertainty) => {
                let _ = write!(
                    out,
                    " (host→guest times ± {uncertainty} cycles: the TSC offset read through IA32_TSC)"
                );
            }
            None => {}
        }
        let _ = writeln!(out);
        let others: Vec<String> = life.other_exits.iter().map(|(k, n)| format!("{n} {k}")).collect();
        if !others.is_empty() {
            let _ = writeln!(out, "other exits of the run: {}", others.join(", "));
        }
        if !life.note.is_empty() {
            let _ = writeln!(out, "{}", life.note);
        }
        let _ = writeln!(out);
    }
    for (path, why) in refused {
        let _ = writeln!(out, "== {path}: refused — {why}\n");
    }
    out.push_str(&render_answers(lives));
    out
}

/// What a bit or field of a CPUID answer is, where a path's answer commonly differs
/// from the host's: the virtual CPU is not the host's (resource control), not a lie.
fn known_field(leaf: u32, register: usize, mask: u32) -> &'static str {
    match (leaf, register) {
        (1, 1) if mask & !0xff00_0000 == 0 => "EBX[31:24]: the initial APIC ID (which CPU ran it)",
        (1, 1) if mask & !0xffff_0000 == 0 => "EBX[31:16]: the APIC ID and logical-processor count (the VM's topology)",
        (1, 2) if mask == 1 << 31 => "ECX[31]: the hypervisor bit",
        (1, 2) if mask & (1 << 27) != 0 => {
            "ECX: features the VM's CPU lacks or enables otherwise (bit 27 OSXSAVE: the guest's own CR4)"
        }
        (1, _) | (7, _) | (0x8000_0001, _) => "feature bits: what KVM lets the virtual CPU offer",
        (0xd, _) => "XSAVE features and sizes: the guest's own XCR0, what KVM offers",
        (0x4000_0000, _) | (0x4000_0003, _) => "the hypervisor leaves: who answers (KVM's signature in a VM)",
        (0, 0) | (0x8000_0000, 0) => "the highest leaf: KVM's table, not the CPU's",
        _ => "",
    }
}

/// The paths' CPUID answers side by side: identical leaves said in one line, each
/// difference from the native answer (or the first path's) named by register and bits.
fn render_answers(lives: &[CpuidLife]) -> String {
    let mut out = String::new();
    let with: Vec<&CpuidLife> = lives.iter().filter(|l| !l.guest_got.is_empty()).collect();
    let Some(base) = with.iter().find(|l| l.path == Path::Native.name()).or(with.first()) else {
        return out;
    };
    let _ = writeln!(
        out,
        "== CPUID answers the guest got, against {} (equivalence: the same program should see the same machine)",
        base.path
    );
    const NAMES: [&str; 4] = ["EAX", "EBX", "ECX", "EDX"];
    let regs = |r: &CpuidRecord| [r.eax, r.ebx, r.ecx, r.edx];
    for record in &base.guest_got {
        // The paths grouped by the answer they got, in path order.
        let mut groups: Vec<([u32; 4], Vec<&str>)> = Vec::new();
        for life in &with {
            let Some(other) = life
                .guest_got
                .iter()
                .find(|r| (r.leaf, r.subleaf) == (record.leaf, record.subleaf))
            else {
                continue;
            };
            match groups.iter_mut().find(|(answer, _)| *answer == regs(other)) {
                Some((_, paths)) => paths.push(&life.path),
                None => groups.push((regs(other), vec![&life.path])),
            }
        }
        let leaf = format!("leaf {:#x}.{}", record.leaf, record.subleaf);
        let differs: Vec<String> = groups
            .iter()
            .filter(|(answer, _)| *answer != regs(record))
            .map(|(answer, paths)| {
                let registers: Vec<String> = (0..4)
                    .filter(|&i| answer[i] != regs(record)[i])
                    .map(|i| {
                        let mask = answer[i] ^ regs(record)[i];
                        let field = known_field(record.leaf, i, mask);
                        format!(
                            "{} {:#010x} (bits {mask:#010x}{}{})",
                            NAMES[i],
                            answer[i],
                            if field.is_empty() { "" } else { ": " },
                            field
                        )
                    })
                    .collect();
                format!("{}: {}", paths.join(", "), registers.join(", "))
            })
            .collect();
        if differs.is_empty() {
            let _ = writeln!(out, "{leaf:<17} the same on every path");
        } else {
            let _ = writeln!(out, "{leaf:<17} {}", differs.join("; "));
        }
    }
    let _ = writeln!(
        out,
        "A difference is resource control, not a failure of equivalence: the VMM (or KVM) decides what CPU the guest \
         has, and tells it truthfully. Equivalence asks that the guest behave as it would on that CPU."
    );
    out
}

/// A round step for an axis: 1, 2 or 5 times a power of ten, about `span / 6`.
fn axis_step(span: f64) -> f64 {
    let raw = (span / 6.0).max(1.0);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
}

/// The paths side by side on one time axis: each row a path (its name and cost on two
/// lines, never cut), each segment a part; refused paths as rows that say so.
pub fn svg(lives: &[CpuidLife], refused: &[(String, String)]) -> String {
    const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];
    let (width, left, row, top) = (1100.0, 250.0, 46.0, 44.0);
    let longest = lives
        .iter()
        .map(|l| {
            l.breakdown
                .iter()
                .map(|p| p.cycles.max(0))
                .sum::<i64>()
                .max(l.guest_visible_cycles)
        })
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let plot_width = width - left - 30.0;
    let scale = plot_width / longest;
    let rows = lives.len() + refused.len();
    let axis_y = top + row * rows as f64 + 4.0;
    let height = axis_y + 40.0 + 100.0;
    let repeats = lives.iter().map(|l| l.traces).max().unwrap_or(1);
    let title = if repeats > 1 {
        format!("The life of one CPUID, path by path: each the median of {repeats} traces (guest TSC cycles, one axis)")
    } else {
        "The life of one CPUID, path by path: one trace each (guest TSC cycles, one axis)".to_owned()
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">{}</text>\n",
        escape(&title)
    );
    for (i, life) in lives.iter().enumerate() {
        let y = top + row * i as f64;
        let cost = if life.traces > 1 {
            format!(
                "{} cycles (of {}..{})",
                life.guest_visible_cycles, life.guest_visible_range.0, life.guest_visible_range.1
            )
        } else {
            format!("{} cycles", life.guest_visible_cycles)
        };
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{:.1}\">{}</text><text x=\"10\" y=\"{:.1}\" fill=\"#555\">{}</text>",
            y + 11.0,
            escape(&life.path),
            y + 25.0,
            escape(&cost)
        );
        let mut x = left;
        for (j, part) in life.breakdown.iter().enumerate() {
            let w = part.cycles.max(0) as f64 * scale;
            let colour = if life.breakdown.len() == 1 {
                "#7f7f7f"
            } else {
                COLOURS[j % COLOURS.len()]
            };
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"26\" fill=\"{colour}\"><title>{}: {} cycles</title></rect>",
                escape(&part.what),
                part.cycles
            );
            x += w;
        }
    }
    for (k, (path, why)) in refused.iter().enumerate() {
        let y = top + row * (lives.len() + k) as f64;
        let short: String = why.chars().take(120).collect();
        let _ = writeln!(
            out,
            "<text x=\"10\" y=\"{:.1}\">{}</text><text x=\"10\" y=\"{:.1}\" fill=\"#555\">refused here</text>\
             <rect x=\"{left}\" y=\"{y:.1}\" width=\"{plot_width:.1}\" height=\"26\" fill=\"none\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555\">refused: {}{}</text>",
            y + 11.0,
            escape(path),
            y + 25.0,
            left + 8.0,
            y + 17.0,
            escape(&short),
            if why.chars().count() > 120 { "…" } else { "" }
        );
    }
    // The axis: guest TSC cycles from 0, round steps.
    let step = axis_step(longest);
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{axis_y:.1}\" x2=\"{:.1}\" y2=\"{axis_y:.1}\" stroke=\"#333\"/>",
        left + plot_width
    );
    let mut tick = 0.0;
    while tick <= longest + 0.5 {
        let x = left + tick * scale;
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{axis_y:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#333\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            axis_y + 5.0,
            axis_y + 18.0,
            tick as i64
        );
        tick += step;
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">guest TSC cycles</text>",
        left + plot_width / 2.0,
        axis_y + 34.0
    );
    let legend_y = axis_y + 46.0;
    for (j, what) in [
        "guest → exit → KVM_RUN returned",
        "in the VMM",
        "TSC moved by shaping",
        "KVM_RUN → guest",
    ]
    .iter()
    .enumerate()
    {
        let y = legend_y + 18.0 * j as f64;
        let _ = writeln!(
            out,
            "<rect x=\"10\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"28\" y=\"{}\">{what}</text>",
            COLOURS[j],
            y + 11.0
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"330\" y=\"{legend_y}\" width=\"12\" height=\"12\" fill=\"#7f7f7f\"/><text x=\"348\" y=\"{}\">no exit reached the VMM (native, or KVM in the kernel)</text>\n</svg>",
        legend_y + 11.0
    );
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(path: &str, cycles: i64, got: Vec<CpuidRecord>) -> CpuidLife {
        CpuidLife {
            path: path.into(),
            leaf: 0,
            subleaf: 0,
            guest_visible_cycles: cycles,
            traces: 3,
            guest_visible_range: (cycles - 10, cycles + 10),
            guest_timestamps: None,
            guest_instruction: None,
            rip: None,
            exit_reason: None,
            registers_out: None,
            guest_got: got,
            vmm_steps: Vec::new(),
            breakdown: vec![Part {
                what: "inside one KVM_RUN".into(),
                cycles,
            }],
            offset_uncertainty: None,
            other_exits: Default::default(),
            note: String::new(),
        }
    }

    fn leaf1(ecx: u32) -> CpuidRecord {
        CpuidRecord {
            leaf: 1,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn the_picture_keeps_whole_labels_an_axis_and_the_refused_paths() {
        let lives = [life("trap-emulate:hw-breakpoint", 42_276, Vec::new())];
        let refused = [(
            "paravirt".to_owned(),
            "TSC moves are not honoured by this KVM".to_owned(),
        )];
        let picture = svg(&lives, &refused);
        assert!(picture.contains(">trap-emulate:hw-breakpoint</text>"), "{picture}");
        assert!(picture.contains("42276 cycles (of 42266..42286)"), "{picture}");
        assert!(picture.contains("median of 3 traces"), "{picture}");
        assert!(
            picture.contains("guest TSC cycles</text>") && picture.contains(">40000</text>"),
            "{picture}"
        );
        assert!(
            picture.contains("refused: TSC moves are not honoured by this KVM"),
            "{picture}"
        );
        assert_eq!(axis_step(42_276.0), 10_000.0);
        assert_eq!(axis_step(3.0), 1.0);
    }

    #[test]
    fn answers_are_compared_with_natives_and_each_difference_is_named() {
        let native = life(
            "native",
            3000,
            vec![leaf1(0x8000_0000 | 1 << 27), CpuidRecord::default()],
        );
        let vm = life("hw-assist", 20_000, vec![leaf1(0x8000_0000), CpuidRecord::default()]);
        let text = render_answers(&[native, vm]);
        assert!(text.contains("against native"), "{text}");
        let leaf1 = text.lines().find(|l| l.starts_with("leaf 0x1.0")).unwrap();
        assert!(leaf1.contains("hw-assist: ECX 0x80000000 (bits 0x08000000"), "{leaf1}");
        assert!(leaf1.contains("OSXSAVE"), "{leaf1}");
        let leaf0 = text.lines().find(|l| l.starts_with("leaf 0x0.0")).unwrap();
        assert!(leaf0.ends_with("the same on every path"), "{leaf0}");
        // Nothing to compare without answers.
        assert!(render_answers(&[life("native", 1, Vec::new())]).is_empty());
    }
}
