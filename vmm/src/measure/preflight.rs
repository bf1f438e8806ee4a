//! Stage 1: everything that refuses a run without running anything, and the CPUs it
//! times on. `inspect` asks the same of every path.

use super::{MeasureError, Measurer, RunSpec, MAX_ITERATIONS};
use crate::arch::x86_64::cpuid::Visibility;
use crate::host::Placement;
use crate::modes::trap_emulate;
use crate::modes::tsc_trap::{self, TscTrapBy};
use crate::modes::Path;
use crate::shaping::latency::Shaping;
use crate::shaping::ShapingError;
use crate::vm::loader::{Payload, PayloadSource};
use guest_payload::{Probe, ABI_VERSION};

impl Measurer {
    /// What refuses `spec` before anything is measured: iterations, shaping on a path
    /// the VMM does not see, the payload ([`preflight`]), counter probes, evasions, RDTSCP.
    pub(super) fn refuse_early(&self, payload: &Payload, spec: &RunSpec) -> Result<(), MeasureError> {
        if spec.iterations == 0 || spec.iterations > MAX_ITERATIONS {
            return Err(MeasureError::Iterations(u64::from(spec.iterations)));
        }
        if spec.shaping != Shaping::None && !spec.path.vmm_handles_cpuid() {
            return Err(ShapingError::NeedsVmmExits(spec.shaping.kind()).into());
        }
        if spec.shaping != Shaping::None && spec.probes & Probe::Cpuid.bit() == 0 {
            return Err(ShapingError::NeedsCpuidProbe(spec.shaping.kind()).into());
        }
        preflight(payload, spec)?;
        if let Some(probe) = guest_payload::probes_in(spec.probes).find(|p| p.needs_counter() && !spec.counter) {
            return Err(MeasureError::ProbeNeedsCounter(probe.name()));
        }
        let tsc_control = match (spec.path, self.kvm()) {
            (Path::Native, _) => Err("native: no KVM"),
            (_, Ok(kvm)) if kvm.tsc_control => Ok(()),
            _ => Err(crate::host::kvm_flavour().0.describe()),
        };
        spec.evasions.check(
            spec.path != Path::Native,
            spec.counter,
            spec.path.vmm_handles_cpuid(),
            spec.shaping.moves_tsc(),
            tsc_control,
        )?;
        // Refused only where the payload would execute it: the guest's CPUID advertises
        // RDTSCP and this KVM still fails on it. Where the CPUID says "no RDTSCP", the
        // payload runs and answers for itself (VMAware 2.6 calls that a VM).
        if spec.path != Path::Native
            && payload.declares(guest_payload::capabilities::RDTSCP)
            && spec.evasions.cpuid().rdtscp == Visibility::Shown
            && self.kvm()?.guest_advertises_rdtscp()
        {
            self.rdtscp_in_guest()?.map_err(|why| MeasureError::RdtscpUnavailable {
                payload: payload.source.to_string(),
                name: declared_name(payload),
                why,
            })?;
        }
        Ok(())
    }

    /// The CPU `spec` times on, its lock taken under the process's `--cpu-lock` policy
    /// (and the counter's CPU, for a run with a counter): `--cpu`, else one this process
    /// already holds, else the last allowed CPU that no other vmm process holds, else the
    /// last allowed one (waited for, or refused).
    pub(super) fn lock_placement(&self, spec: &RunSpec) -> Result<Placement, MeasureError> {
        let allowed = crate::host::allowed_cpus();
        let policy = crate::cpu_lock::policy();
        let mut locks = self.cpu_locks.borrow_mut();
        let timing = match spec.cpu {
            Some(cpu) => Some(cpu),
            None => match allowed.iter().rev().find(|&&c| locks.holds(c)) {
                Some(&held) => Some(held),
                None if policy == crate::cpu_lock::CpuLockPolicy::Off => None,
                None => {
                    let mut free = None;
                    for &cpu in allowed.iter().rev() {
                        if locks.try_take(cpu)? {
                            free = Some(cpu);
                            break;
                        }
                    }
                    free
                }
            },
        };
        // Chosen where every back end chooses: the CPU asked for (or found free), else the
        // last allowed; the counter's on another.
        let placement = Placement::choose(timing, spec.counter)?;
        let interrupted = || crate::interrupt::caught().is_some();
        let mut say = |line: &str| eprintln!("{line}");
        locks.take(placement.timing, policy, &interrupted, &mut say)?;
        if let Some(counter) = placement.counter {
            locks.take(counter, policy, &interrupted, &mut say)?;
        }
        Ok(placement)
    }
}

/// Everything that refuses `spec` for `payload` without running anything: what the payload
/// declares, a native twin where one is needed, sites the trap can take. `inspect` asks
/// the same for every path.
pub fn preflight(payload: &Payload, spec: &RunSpec) -> Result<(), MeasureError> {
    check_declaration(payload, spec)?;
    if spec.tsc_trap == TscTrapBy::HwBreakpoint {
        let traps = spec.evasions.traps().filter(|traps| traps.any_instruction());
        let traps = traps.ok_or(MeasureError::TscTrapUnused(spec.tsc_trap.name()))?;
        let cpuid_slots = match spec.path {
            Path::TrapEmulate(trap_emulate::Trap::HwBreakpoint) => spec.cpuid_sites(payload).len(),
            _ => 0,
        };
        tsc_trap::check_breakpoint_sites(&payload.tsc_sites, traps, cpuid_slots)?;
    }
    match spec.path {
        Path::Native => native_twin(payload).map(|_| ()),
        Path::TrapEmulate(trap) => Ok(trap_emulate::check_sites(trap, spec.cpuid_sites(payload).len())?),
        Path::HwAssist | Path::Paravirt => Ok(()),
    }
}

/// The native twin a native run of `payload` executes; `None` for the embedded timing
/// core, which runs in a host thread of this process.
pub fn native_twin(payload: &Payload) -> Result<Option<std::path::PathBuf>, MeasureError> {
    match &payload.source {
        PayloadSource::Embedded => Ok(None),
        PayloadSource::Generated(what) => Err(MeasureError::NoNativeTwin {
            payload: (*what).to_owned(),
            twin: "(a generated probe has none)".to_owned(),
        }),
        PayloadSource::File(path) => {
            let twin = crate::native::twin_of(path);
            if !twin.is_file() {
                return Err(MeasureError::NoNativeTwin {
                    payload: path.display().to_string(),
                    twin: twin.display().to_string(),
                });
            }
            Ok(Some(twin))
        }
    }
}

/// The name a payload declares, for messages.
fn declared_name(payload: &Payload) -> String {
    payload.declared_name().unwrap_or_else(|| "declares nothing".to_owned())
}

/// What the payload declared against what the run asks of it, before anything runs. A
/// payload that declares nothing may still run where nothing is asked of it.
fn check_declaration(payload: &Payload, spec: &RunSpec) -> Result<(), MeasureError> {
    let name = declared_name(payload);
    if let Some(info) = payload.info {
        if info.magic != guest_payload::PAYLOAD_INFO_MAGIC {
            return Err(MeasureError::PayloadInfoMagic {
                payload: payload.source.to_string(),
                found: info.magic,
            });
        }
        if info.abi_version != ABI_VERSION {
            return Err(MeasureError::PayloadAbi {
                payload: payload.source.to_string(),
                found: info.abi_version,
            });
        }
    }
    if !spec.counter && payload.declares(guest_payload::capabilities::COUNTER) {
        return Err(MeasureError::PayloadNeedsCounter {
            payload: payload.source.to_string(),
            name,
        });
    }
    if spec.path == Path::Paravirt && !payload.declares(guest_payload::capabilities::PARAVIRT_CPUID) {
        return Err(MeasureError::PayloadCannot {
            payload: payload.source.to_string(),
            name,
            what: "paravirtual CPUID (VMM_CAP_PARAVIRT_CPUID)",
            mode: "paravirt",
        });
    }
    Ok(())
}
