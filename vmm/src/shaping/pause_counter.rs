//! `pause-counter`: the counter vCPU stands still for the whole of every exit vCPU 0 takes
//! to this VMM, as an evader stops a detector's counter thread with IPIs while it handles
//! an exit. A clock that stops with the exit cannot time it; the `counter-stall` rule
//! looks for exactly that (the TSC runs on while the counter does not).

use super::evasion::{EvasionKind, Needs};
use super::policy::{ExitPolicy, ShapingError};
use crate::vm::vcpu::Vcpu;

pub const KIND: EvasionKind = EvasionKind {
    name: "pause-counter",
    argument: None,
    does: "stops the counter vCPU for the whole of each exit vCPU 0 takes to userspace",
    as_in: "evaders pausing a detector's counter thread with IPIs",
    needs: Needs {
        counter: true,
        vmm_exits: true,
        ..Needs::NONE
    },
    check: |_| Ok(()),
    build: |_| Box::new(PauseCounter),
};

/// Pauses the counter vCPU as each exit begins and lets it go as it ends.
pub struct PauseCounter;

/// Pauses the run's counter vCPU, for as long as the run may last.
pub(super) fn pause(vcpu: &dyn Vcpu, policy: &'static str) -> Result<(), ShapingError> {
    let counter = vcpu.counter().ok_or(ShapingError::NoCounter(policy))?;
    counter.pause(&|| vcpu.past_deadline())?;
    Ok(())
}

impl ExitPolicy for PauseCounter {
    fn exit_began(&mut self, vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        pause(vcpu, KIND.name)
    }

    fn exit_ended(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        if let Some(counter) = vcpu.counter() {
            counter.resume(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::{SimCounter, SimVcpu};

    #[test]
    fn the_counter_stands_still_for_each_exit_and_only_for_it() {
        let mut vcpu = SimVcpu::new();
        vcpu.counter = Some(SimCounter::default());
        let mut policy = PauseCounter;
        for _ in 0..3 {
            policy.exit_began(&mut vcpu, 0).unwrap();
            assert_eq!(vcpu.counter.as_ref().unwrap().depth.get(), 1, "paused during the exit");
            policy.exit_ended(&mut vcpu).unwrap();
            assert_eq!(vcpu.counter.as_ref().unwrap().depth.get(), 0, "running again");
        }
        assert_eq!(vcpu.counter.as_ref().unwrap().pauses.get(), 3);
        assert_eq!(vcpu.counter.as_ref().unwrap().tsc_moved.get(), 0, "no clock moved");
    }

    #[test]
    fn a_run_without_a_counter_or_with_one_that_ended_is_refused() {
        let mut vcpu = SimVcpu::new();
        assert!(matches!(
            PauseCounter.exit_began(&mut vcpu, 0),
            Err(ShapingError::NoCounter("pause-counter"))
        ));
        vcpu.counter = Some(SimCounter {
            gone: true,
            ..Default::default()
        });
        assert!(matches!(
            PauseCounter.exit_began(&mut vcpu, 0),
            Err(ShapingError::Counter(_))
        ));
    }
}
