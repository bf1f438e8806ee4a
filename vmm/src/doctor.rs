//! `vmm doctor`: can this host run vmm, and what will its figures mean?
//! One line per check with a verdict; any failure makes the command exit non-zero.

use crate::host::{self, KvmFlavour};
use crate::measure::{Measurer, RunSpec};
use crate::modes::trap_emulate::Trap;
use crate::modes::Path;
use crate::vm::loader::Payload;
use crate::vm::vcpu::RegisterAccess;
use guest_payload::Probe;
use kvm_ioctls::Cap;
use serde::Serialize;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

fn check(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict,
        detail: detail.into(),
    }
}

/// The capabilities the modes rely on, and what goes missing without each.
const CAPABILITIES: &[(Cap, &str, Verdict)] = &[
    (Cap::UserMemory, "guest memory (every VM mode)", Verdict::Fail),
    (Cap::ExtCpuid, "CPUID tables (every VM mode)", Verdict::Fail),
    (Cap::SetGuestDebug, "debug traps (trap-emulate)", Verdict::Warn),
    (Cap::GetTscKhz, "the guest TSC rate (ns figures)", Verdict::Warn),
    (Cap::ImmediateExit, "prompt watchdog stops", Verdict::Warn),
];

pub fn run_checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let cpu = host::cpu_info();
    let (flavour, module) = host::kvm_flavour();

    let kvm = if !std::path::Path::new("/dev/kvm").exists() {
        checks.push(check(
            "/dev/kvm",
            Verdict::Fail,
            "absent: load kvm_intel or kvm_amd, and enable VT-x/AMD-V in the firmware",
        ));
        None
    } else {
        let measurer = Measurer::open();
        match measurer.kvm() {
            Ok(_) => {
                checks.push(check("/dev/kvm", Verdict::Ok, "present and opened read-write"));
                Some(measurer)
            }
            Err(e) => {
                checks.push(check("/dev/kvm", Verdict::Fail, e.to_string()));
                None
            }
        }
    };

    if let Some(context) = kvm.as_ref().and_then(|m| m.kvm().ok()) {
        let kvm = &context.kvm;
        let version = kvm.get_api_version();
        let verdict = if version == 12 { Verdict::Ok } else { Verdict::Fail };
        checks.push(check("KVM API version", verdict, format!("{version} (vmm needs 12)")));
        for &(cap, needed_for, missing) in CAPABILITIES {
            let (verdict, state) = if kvm.check_extension(cap) {
                (Verdict::Ok, "available")
            } else {
                (missing, "missing")
            };
            checks.push(check("capability", verdict, format!("{cap:?}: {state} — {needed_for}")));
        }
        let access = match context.registers {
            RegisterAccess::SyncRegs => "KVM_CAP_SYNC_REGS: registers travel in kvm_run, no ioctl per exit",
            RegisterAccess::Ioctls => "no KVM_CAP_SYNC_REGS for the general registers: one KVM_GET_REGS (and at most one KVM_SET_REGS) per emulated exit",
        };
        checks.push(check("exit path", Verdict::Ok, access));
        checks.push(if kvm.check_extension(kvm_ioctls::Cap::X86UserSpaceMsr) {
            check(
                "MSR exits",
                Verdict::Ok,
                format!(
                    "KVM_CAP_X86_USER_SPACE_MSR: filtered MSR reads reach the VMM ({} answer MSR reads)",
                    msr_evaders()
                ),
            )
        } else {
            check(
                "MSR exits",
                Verdict::Warn,
                format!(
                    "no KVM_CAP_X86_USER_SPACE_MSR: the evaders that answer MSR reads ({}) are refused",
                    msr_evaders()
                ),
            )
        });
    }

    let flavour_verdict = match flavour {
        KvmFlavour::HardwareVtX | KvmFlavour::HardwareAmdV => Verdict::Ok,
        KvmFlavour::Software => Verdict::Warn,
        KvmFlavour::Unknown => Verdict::Fail,
    };
    let flavour_note = match flavour {
        KvmFlavour::Software => ": guest instructions are emulated, so guest timings are far from a hardware VM's",
        _ => "",
    };
    checks.push(check(
        "KVM flavour",
        flavour_verdict,
        format!(
            "{}{}{flavour_note}",
            flavour.describe(),
            module.map_or(String::new(), |m| format!(", module {m}"))
        ),
    ));
    let cpu_virt = match (cpu.vmx, cpu.svm) {
        (true, _) => (Verdict::Ok, "VT-x (vmx) in the CPU flags"),
        (_, true) => (Verdict::Ok, "AMD-V (svm) in the CPU flags"),
        _ => (
            Verdict::Warn,
            "neither vmx nor svm in the CPU flags: no hardware virtualisation",
        ),
    };
    checks.push(check(
        "CPU virtualisation",
        cpu_virt.0,
        format!("{} — {}", cpu.model, cpu_virt.1),
    ));
    checks.push(if cpu.host_is_vm {
        check("host is a VM", Verdict::Warn, "yes (CPUID.1:ECX[31]): native figures include the outer hypervisor's costs, and native CPUID is itself a VM exit")
    } else {
        check("host is a VM", Verdict::Ok, "no: native runs are bare metal")
    });
    checks.push(if cpu.invariant_tsc {
        check("invariant TSC", Verdict::Ok, "the TSC ticks at a constant rate")
    } else {
        check(
            "invariant TSC",
            Verdict::Warn,
            "not advertised: cycle counts may drift with frequency changes",
        )
    });
    let tsc = host::tsc_frequency(kvm.as_ref().and_then(|m| m.kvm().ok()).and_then(|k| k.tsc_khz));
    checks.push(check(
        "TSC frequency",
        Verdict::Ok,
        format!("{:.3} GHz ({})", f64::from(tsc.khz) / 1e6, tsc.source.describe()),
    ));

    checks.push(sandbox_check());
    checks.push(two_vcpus_check());
    checks.push(tsc_scaling_check(kvm.as_ref().and_then(|m| m.kvm().ok())));
    if let Some(measurer) = &kvm {
        checks.push(boot_check(measurer));
        checks.push(tsc_moves_check(measurer));
        for trap in [Trap::HwBreakpoint, Trap::Int3Patch, Trap::IoPatch] {
            checks.push(trap_check(measurer, trap));
        }
        let advertised = measurer.kvm().is_ok_and(|k| k.guest_advertises_rdtscp());
        checks.push(match measurer.rdtscp_in_guest() {
            Ok(Ok(())) => check("rdtscp in a guest", Verdict::Ok, "runs (payloads that declare VMM_CAP_RDTSCP can run here)"),
            Ok(Err(why)) if !advertised => check(
                "rdtscp in a guest",
                Verdict::Warn,
                format!("fails ({why}), and the guest's CPUID does not advertise it (80000001H:EDX[27] clear): payloads that declare VMM_CAP_RDTSCP run and see a CPU without it (VMAware's TIMER answers VM)"),
            ),
            Ok(Err(why)) => check(
                "rdtscp in a guest",
                Verdict::Warn,
                format!("fails ({why}) although the guest's CPUID advertises it: payloads that declare VMM_CAP_RDTSCP, such as VMAware's TIMER, are refused on this KVM"),
            ),
            Err(error) => check("rdtscp in a guest", Verdict::Warn, format!("could not be probed: {error}")),
        });
        const VMCALL: &str = "vmcall in a guest";
        checks.push(match measurer.vmcall_in_guest() {
            Ok(Ok(())) => check(
                VMCALL,
                Verdict::Ok,
                "runs: KVM answers the guest's hypercall instruction (an unknown hypercall returns -KVM_ENOSYS)",
            ),
            Ok(Err(why)) => check(
                VMCALL,
                Verdict::Warn,
                format!("fails ({why}): a guest cannot make KVM hypercalls here"),
            ),
            Err(error) => check(VMCALL, Verdict::Warn, format!("could not be probed: {error}")),
        });
        checks.push(if measurer.kvmclock_in_guest() {
            check("kvmclock in a guest", Verdict::Ok, "KVM takes MSR_KVM_SYSTEM_TIME_NEW: the timing core reads kvmclock (tsc-kvmclock-rate)")
        } else {
            check("kvmclock in a guest", Verdict::Warn, "KVM refused the MSR_KVM_SYSTEM_TIME_NEW write: runs read no kvmclock, and tsc-kvmclock-rate says unsure")
        });
        const FLOAT: &str = "floating point in a guest";
        checks.push(match measurer.float_in_guest() {
            Ok(Ok(())) => check(FLOAT, Verdict::Ok, "SSE arithmetic runs (payloads may compute in double)"),
            Ok(Err(why)) => check(
                FLOAT,
                Verdict::Warn,
                format!("fails ({why}): this KVM emulates guest instructions and runs no SSE or x87 arithmetic; a payload that computes in double stops there, naming the instruction (docs/sdk.md)"),
            ),
            Err(error) => check(FLOAT, Verdict::Warn, format!("could not be probed: {error}")),
        });
    }
    checks
}

/// What `--vcpus 2` needs: a second CPU for the counter vCPU.
fn two_vcpus_check() -> Check {
    let cpus = crate::host::allowed_cpus();
    if cpus.len() >= 2 {
        check(
            "two vCPUs",
            Verdict::Ok,
            format!(
                "{} CPUs for this process: the counter vCPU gets one of its own",
                cpus.len()
            ),
        )
    } else {
        check(
            "two vCPUs",
            Verdict::Warn,
            format!(
                "this process may run on CPU {cpus:?} only: --vcpus 2 is refused (the counter needs a CPU of its own)"
            ),
        )
    }
}

/// TSC scaling (`KVM_CAP_TSC_CONTROL`): a guest TSC at a rate of the VMM's choosing, what
/// `--evade tsc-khz` needs.
fn tsc_scaling_check(kvm: Option<&crate::vm::kvm::KvmContext>) -> Check {
    const NAME: &str = "TSC scaling";
    match kvm {
        Some(k) if k.tsc_control => check(
            NAME,
            Verdict::Ok,
            "offered (KVM_CAP_TSC_CONTROL): --evade tsc-khz can run",
        ),
        Some(_) => check(
            NAME,
            Verdict::Warn,
            "not offered (KVM_CAP_TSC_CONTROL absent): --evade tsc-khz is refused",
        ),
        None => check(NAME, Verdict::Warn, "unknown (no KVM)"),
    }
}

/// The vCPU threads' seccomp filter, proven on a thread of its own: installed (the
/// kernel's `Seccomp:` field) and refusing what no vCPU thread does.
fn sandbox_check() -> Check {
    let (calls, ioctls) = crate::vm::sandbox::allowed_counts();
    match crate::vm::sandbox::self_test() {
        Ok(test)
            if test.mode == Some(2)
                && [
                    test.open_errno,
                    test.socket_errno,
                    test.stdout_errno,
                    test.exec_mmap_errno,
                    test.foreign_ioctl_errno,
                    test.unlisted_ioctl_errno,
                ]
                .iter()
                .all(|&errno| errno == Some(libc::EPERM))
                && test.own_ioctl_errno.is_some_and(|errno| errno != libc::EPERM) =>
        {
            check(
                "sandbox",
                Verdict::Ok,
                format!("vCPU threads run under a seccomp filter ({calls} system calls, {ioctls} KVM ioctls on the thread's own vCPU only, checked both ways; a file, a socket, a write other than to stderr and an executable mapping are refused with EPERM, checked now); guest RAM is excluded from core dumps"),
            )
        }
        Ok(test) => check(
            "sandbox",
            Verdict::Fail,
            format!("the seccomp filter does not hold: {test:?}"),
        ),
        Err(error) => check("sandbox", Verdict::Fail, error.to_string()),
    }
}

/// Boots the embedded payload for a handful of samples: the end-to-end check.
/// Do TSC moves reach the guest? The very probe shaping runs before `--hide`,
/// `--virtual-inject-cycles` and profiles (paravirt: the one VMM-handled path every KVM
/// delivers), so what doctor says is what those runs will find.
fn tsc_moves_check(measurer: &Measurer) -> Check {
    const NAME: &str = "TSC offset writes";
    let spec = RunSpec {
        timeout: Duration::from_secs(20),
        ..RunSpec::new(Path::Paravirt)
    };
    match measurer.probe_tsc_moves(&spec) {
        Ok(method) => check(
            NAME,
            Verdict::Ok,
            format!("honoured ({method:?}): --hide, --virtual-inject-cycles and --profile can run here"),
        ),
        Err(crate::measure::MeasureError::Shaping(error)) => check(NAME, Verdict::Warn, format!("ignored: {error}")),
        Err(error) => check(NAME, Verdict::Warn, format!("could not be probed: {error}")),
    }
}

/// Does `--trap T` reach the VMM here? The probe trap-emulate runs before each run.
/// Named `trap NAME` (tests read it by that name).
fn trap_check(measurer: &Measurer, trap: Trap) -> Check {
    let name = match trap {
        Trap::HwBreakpoint => "trap hw-breakpoint",
        Trap::Int3Patch => "trap int3-patch",
        Trap::IoPatch => "trap io-patch",
    };
    let spec = RunSpec {
        timeout: Duration::from_secs(20),
        ..RunSpec::new(Path::TrapEmulate(trap))
    };
    match measurer.probe_trap(&spec, trap) {
        Ok(delivery) => check(name, Verdict::Ok, format!("delivered {}", delivery.describe())),
        Err(error) => check(name, Verdict::Warn, format!("not delivered here: {error}")),
    }
}

fn boot_check(measurer: &Measurer) -> Check {
    let spec = RunSpec {
        iterations: 200,
        warmup: 10,
        timeout: Duration::from_secs(20),
        ..RunSpec::new(Path::HwAssist)
    };
    let result = Payload::embedded()
        .map_err(|e| e.to_string())
        .and_then(|payload| measurer.measure(&payload, &spec, None).map_err(|e| e.to_string()));
    match result {
        Ok(m) => {
            let median = |p: Probe| m.results.samples.get(&p).map_or(0, |s| crate::stats::median(s));
            check(
                "guest boot",
                Verdict::Ok,
                format!(
                    "the embedded payload ran in hw-assist mode: setup {} µs, CPUID median {} cycles, NOP median {} cycles",
                    m.setup.map_or(0, |d| d.as_micros()),
                    median(Probe::Cpuid),
                    median(Probe::Nop)
                ),
            )
        }
        Err(e) => check("guest boot", Verdict::Fail, e),
    }
}

pub fn render(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            let verdict = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            format!("[{verdict}] {:<20} {}\n", c.name, c.detail)
        })
        .collect()
}

pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.verdict != Verdict::Fail)
}

/// The zoo members that trap MSR reads, from their files.
fn msr_evaders() -> String {
    crate::shaping::evader::zoo()
        .filter(|(_, file)| !file.traps.msr.is_empty())
        .map(|(name, _)| name)
        .collect::<Vec<_>>()
        .join(", ")
}
