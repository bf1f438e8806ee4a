//! `shared-offset`: one TSC offset for the whole VM, as kvm-rdtsc-hack keeps it. The
//! counter vCPU is paused for each exit (its clock must not see the exit either) and,
//! while paused, makes the TSC moves vCPU 0's latency shaping made — never more backwards
//! than it stood still, so its own clock never runs back. What it could not apply is the
//! difference between `shared_moves_wanted` and `shared_moves_applied` in the report:
//! how far the two vCPUs' TSCs now disagree (the `cross-vcpu-tsc` rule's evidence).

use super::evasion::{EvasionKind, Needs};
use super::pause_counter;
use super::policy::{ExitPolicy, ShapingError};
use crate::vm::vcpu::Vcpu;
use crate::vm::VmSetup;

pub const KIND: EvasionKind = EvasionKind {
    name: "shared-offset",
    argument: None,
    does: "pauses the counter vCPU too, and makes vCPU 0's TSC moves on it (never running its clock back)",
    as_in: "one offset for the whole VM (kvm-rdtsc-hack)",
    needs: Needs {
        counter: true,
        vmm_exits: true,
        tsc_moves: true,
        ..Needs::NONE
    },
    check: |_| Ok(()),
    build: |_| Box::new(SharedOffset),
};

/// Pauses the counter vCPU for each exit and passes vCPU 0's TSC moves on to it.
pub struct SharedOffset;

impl ExitPolicy for SharedOffset {
    fn prepare(&mut self, vm: &mut dyn VmSetup) -> Result<(), ShapingError> {
        if !vm.has_counter() {
            return Err(ShapingError::NoCounter(KIND.name));
        }
        vm.enable_counter_tsc_moves().map_err(|source| ShapingError::Setup {
            policy: KIND.name,
            source: Box::new(source),
        })
    }

    fn exit_began(&mut self, vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        pause_counter::pause(vcpu, KIND.name)
    }

    fn exit_ended(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        let moved = vcpu.take_moved();
        if let Some(counter) = vcpu.counter() {
            counter.resume(moved);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::latency::{Latency, Shaping};
    use crate::shaping::pause_counter::PauseCounter;
    use crate::shaping::Policies;
    use crate::vm::vcpu::sim::{SimCounter, SimVcpu};

    #[test]
    fn the_counter_makes_vcpu0s_moves_once_per_exit_even_under_a_second_pause() {
        let mut vcpu = SimVcpu::new();
        vcpu.counter = Some(SimCounter::default());
        let mut policies = Policies::new(vec![
            Box::new(Latency::new(Shaping::VirtualInject { cycles: 5_000 }, 0, 0)),
            Box::new(PauseCounter),
            Box::new(SharedOffset),
        ]);
        policies.arm(&mut vcpu).unwrap();
        for _ in 0..2 {
            policies.exit_began(&mut vcpu, 0).unwrap();
            policies.cpuid_answered(&mut vcpu, 0).unwrap();
            assert_eq!(vcpu.counter.as_ref().unwrap().tsc_moved.get() % 5_000, 0);
            policies.exit_ended(&mut vcpu).unwrap();
        }
        let counter = vcpu.counter.as_ref().unwrap();
        assert_eq!(counter.pauses.get(), 2, "nested pauses wait once");
        assert_eq!(counter.tsc_moved.get(), 10_000, "both exits' moves, shared");
        assert_eq!(vcpu.tsc_offset, 10_000);
    }
}
