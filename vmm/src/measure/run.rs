//! Stage 4: one VM run of a spec, with the mode that answers its CPUIDs and the policies
//! that shape them; no probe, no calibration. Probes and calibration rounds boot their VMs
//! through here too.

use super::{MeasureError, Measurement, Measurer, RunSpec};
use crate::host::Placement;
use crate::modes::hw_assist::HwAssist;
use crate::modes::paravirt::Paravirt;
use crate::modes::trap_emulate::TrapEmulate;
use crate::modes::tsc_trap::TscTrap;
use crate::modes::{Answerer, ExitPath, ModeError, Path};
use crate::results::{ProbeSamples, ResultsError};
use crate::shaping::latency::Latency;
use crate::shaping::{ExitPolicy, Policies};
use crate::vm::accounting::ExitStats;
use crate::vm::handler::ExitKind;
use crate::vm::loader::Payload;
use crate::vm::trace::{ExitTrace, NoTrace};
use crate::vm::GuestVm;
use guest_payload::ports;
use guest_payload::timing::{CPUID_QUERY_SITE_SYMBOL, HYPERCALL_QUERY_SITE_SYMBOL};
use std::io::Write;

impl Measurer {
    /// One VM run of `spec` shaped by `latency` and `spec`'s evasions.
    pub fn run_vm(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        latency: Latency,
        console: Option<&mut (dyn Write + Send)>,
    ) -> Result<Measurement, MeasureError> {
        let placement = Placement::choose(spec.cpu, spec.counter)?;
        self.run_vm_traced(payload, spec, placement, latency, console, &mut NoTrace)
    }

    pub(super) fn run_vm_traced<T: ExitTrace>(
        &self,
        payload: &Payload,
        spec: &RunSpec,
        placement: Placement,
        latency: Latency,
        console: Option<&mut (dyn Write + Send)>,
        trace: &mut T,
    ) -> Result<Measurement, MeasureError> {
        let mut config = self.with_tsc_rate(spec.guest_config());
        if self.kvmclock_in_guest() {
            config.flags |= guest_payload::flags::KVMCLOCK;
        }
        // The clocks only some runs can read: RDTSCP where this KVM runs it (an emulating
        // KVM stops the guest there) and the guest's CPUID says it has it (as a detector
        // checks first: hidden, SVM's KVM raises #UD), APERF and MPERF where an evader
        // serves their reads (KVM alone answers them with #GP).
        if spec.evasions.cpuid().rdtscp != crate::arch::x86_64::cpuid::Visibility::Hidden
            && self.kvm().is_ok_and(|k| k.guest_advertises_rdtscp())
            && matches!(self.rdtscp_in_guest(), Ok(Ok(())))
        {
            config.flags |= guest_payload::flags::RDTSCP_CLOCK;
        }
        let msrs = spec.evasions.trapped_msrs();
        if [
            guest_payload::clocks::MSR_IA32_APERF,
            guest_payload::clocks::MSR_IA32_MPERF,
        ]
        .iter()
        .all(|m| msrs.contains(m))
        {
            config.flags |= guest_payload::flags::APERF_MPERF;
        }
        let mut vm = GuestVm::create(self.kvm()?, payload, &config, spec.evasions.cpuid())?;
        vm.place(placement);
        // Sized before the run: no reallocation inside an exit hide must account for.
        let mut latency = latency;
        latency.reserve(spec.expected_cpuid_exits());
        let mut policies: Vec<Box<dyn ExitPolicy>> = vec![Box::new(latency)];
        policies.extend(spec.evasions.policies());
        let mut policy = Policies::new(policies);
        policy.prepare(&mut vm)?;
        let cpuid = vm.cpuid_table().clone();
        let mut answerer: Box<dyn Answerer> = match spec.path {
            Path::Native | Path::HwAssist => Box::new(HwAssist),
            Path::TrapEmulate(trap) => {
                let handler = TrapEmulate::new(
                    trap,
                    spec.cpuid_sites(payload),
                    payload.symbol(CPUID_QUERY_SITE_SYMBOL),
                    cpuid,
                );
                Box::new(if spec.bare_exits { handler.bare() } else { handler })
            }
            Path::Paravirt => {
                let handler = Paravirt::new(cpuid, payload.symbol(HYPERCALL_QUERY_SITE_SYMBOL));
                Box::new(if spec.bare_exits { handler.bare() } else { handler })
            }
        };
        if !msrs.is_empty() {
            vm.trap_msr_reads(&msrs)?;
        }
        let mut tsc_trap = spec
            .evasions
            .traps()
            .map(|traps| TscTrap::new(payload.tsc_sites.clone(), traps.clone(), spec.tsc_trap));
        let stats = vm
            .run_traced(
                &mut ExitPath {
                    answerer: answerer.as_mut(),
                    policy: &mut policy,
                    tsc_trap: tsc_trap.as_mut(),
                    console,
                },
                spec.timeout,
                trace,
            )
            .map_err(|e| match e {
                crate::vm::RunError::Vm(e) => MeasureError::Vm(e.placed_in(payload)),
                other => other.into(),
            })?;
        let results = vm.results()?;
        check_timing_core(payload, spec, &results.samples)?;
        let recorded = policy.recorded();
        let measurement = Measurement {
            results,
            counter: stats.counter,
            exits: stats.exits,
            setup: Some(stats.setup),
            run: stats.run,
            register_access: Some(vm.register_access()),
            shaped: recorded.shaped,
            tsc_method: recorded.tsc_method,
            trap_delivery: answerer.delivery(),
            tsc_trap: tsc_trap.map(|trap| trap.record().clone()),
            ..Default::default()
        };
        check_path_was_taken(spec, &measurement.exits)?;
        Ok(measurement)
    }
}

/// A payload that declares the timing core must report exactly what it was asked for.
fn check_timing_core(payload: &Payload, spec: &RunSpec, samples: &ProbeSamples) -> Result<(), ResultsError> {
    let declared = payload.declares(guest_payload::capabilities::TIMING_CORE);
    let complete = guest_payload::probes_in(spec.probes)
        .all(|probe| samples.get(&probe).is_some_and(|s| s.len() == spec.iterations as usize));
    if declared && (!complete || samples.len() != spec.probes.count_ones() as usize) {
        return Err(ResultsError::Invalid(
            "the guest measured something other than what was asked",
        ));
    }
    Ok(())
}

/// A run on a VMM path whose CPUID never reached the VMM measured something else: say so.
fn check_path_was_taken(spec: &RunSpec, exits: &ExitStats) -> Result<(), ModeError> {
    if !spec.measures_cpuid() {
        return Ok(());
    }
    match spec.path {
        Path::Paravirt if exits.count(ExitKind::CpuidHypercall) == 0 => {
            Err(ModeError::NoHypercalls { port: ports::HYPERCALL })
        }
        Path::TrapEmulate(_) if exits.count(ExitKind::CpuidTrap) == 0 => Err(ModeError::NoTraps {
            exits: exits.count(ExitKind::CpuidQueryTrap),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::trap_emulate::Trap;
    use guest_payload::Probe;

    fn exits(kind: ExitKind, count: usize) -> ExitStats {
        let mut stats = ExitStats::default();
        for _ in 0..count {
            stats.record(kind, 1);
        }
        stats
    }

    #[test]
    fn a_vmm_path_whose_cpuid_never_reached_the_vmm_is_an_error() {
        let paravirt = RunSpec::new(Path::Paravirt);
        assert!(matches!(
            check_path_was_taken(&paravirt, &exits(ExitKind::Console, 3)),
            Err(ModeError::NoHypercalls { .. })
        ));
        assert!(check_path_was_taken(&paravirt, &exits(ExitKind::CpuidHypercall, 3)).is_ok());
        let trap = RunSpec::new(Path::TrapEmulate(Trap::IoPatch));
        assert!(matches!(
            check_path_was_taken(&trap, &exits(ExitKind::CpuidQueryTrap, 8)),
            Err(ModeError::NoTraps { exits: 8 })
        ));
        let no_cpuid_probe = RunSpec {
            probes: Probe::Nop.bit(),
            ..RunSpec::new(Path::Paravirt)
        };
        assert!(check_path_was_taken(&no_cpuid_probe, &ExitStats::default()).is_ok());
        assert!(check_path_was_taken(&RunSpec::new(Path::HwAssist), &ExitStats::default()).is_ok());
    }
}
