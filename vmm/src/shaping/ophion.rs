//! `cpuid-cost`: zer0condition/Ophion's armed RDTSC, as its code reads at
//! 7b501992bd71af7f5330ec697a1cbe27921157f9. `vmexit_handler` reads the host TSC as its
//! first statement (`src/vmexit.c` L858-L864); after a CPUID exit it keeps that as
//! `tsc_cpuid_entry` and turns RDTSC exiting on (L1030-L1042, every leaf). The next RDTSC
//! or RDTSCP answers `tsc_cpuid_entry + bare_metal_cpuid_cost + TSC offset` and turns it
//! off again (L976-L1017, L1292-L1326); any other exit first disarms it (L889-L902).
//! `bare_metal_cpuid_cost` is the least of 200 timings of `lfence; rdtsc; lfence;
//! cpuid(0); lfence; rdtsc; lfence` taken before launch (`src/stealth.c` L48-L74). Reads
//! of MSR 0x10 are intercepted but answer the real guest TSC (`vmexit.c` L282-L295), so
//! the evader file leaves them to KVM, which reads the same.
//!
//! Here the armed read is a patch made after the CPUID exit and undone after the read
//! (`modes/tsc_trap.rs`); the CPUID's time is the guest TSC as KVM_RUN returned; the cost
//! is timed on the VMM's thread with the payload's own fenced TSC read and CPUID query.
//! Not reproduced: the code is compiled out in the original's default build
//! (`include/stealth.h` L26, `STEALTH_COMPENSATE_TIMING 0`, though its README says 1);
//! RDTSCP's ECX is the host core's TSC_AUX there (0 here).

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;
use crate::vm::VmSetup;
use guest_payload::timing::CpuidCall;
use guest_payload::timing::{query_cpuid, read_tsc};

/// Samples of the bare-metal CPUID cost, the least kept (`stealth.c` L48-L74).
pub const COST_SAMPLES: usize = 200;

/// The least cycles of a fenced TSC read, CPUID(0) and fenced TSC read, on this thread.
pub fn bare_metal_cpuid_cost() -> u64 {
    (0..COST_SAMPLES)
        .map(|_| {
            let start = read_tsc();
            let _ = query_cpuid(CpuidCall::Instruction, 0, 0);
            read_tsc().saturating_sub(start)
        })
        .min()
        .unwrap_or(0)
}

/// One vCPU's armed read.
#[derive(Debug)]
pub struct CpuidCost {
    /// `bare_metal_cpuid_cost`, once measured (`prepare`) or given.
    cost: Option<u64>,
    /// The guest's TSC minus the host's (`arm`).
    offset: i64,
    /// The guest TSC at the CPUID exit just answered.
    at_cpuid: Option<u64>,
    /// The same, for the exit under way: set only if the exit before was that CPUID.
    armed: Option<u64>,
}

impl CpuidCost {
    /// `cost`: the bare-metal CPUID cost, or `None` to measure it before the run.
    pub fn new(cost: Option<u64>) -> Self {
        Self {
            cost,
            offset: 0,
            at_cpuid: None,
            armed: None,
        }
    }
}

impl ExitPolicy for CpuidCost {
    fn prepare(&mut self, _vm: &mut dyn VmSetup) -> Result<(), ShapingError> {
        if self.cost.is_none() {
            self.cost = Some(bare_metal_cpuid_cost());
        }
        Ok(())
    }

    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        self.offset = vcpu.tsc_offset()?;
        Ok(())
    }

    /// Armed only across exactly one exit boundary: any exit disarms what the one before
    /// armed, unless it is the read itself.
    fn exit_began(&mut self, _vcpu: &mut dyn Vcpu, _exit_tsc: u64) -> Result<(), ShapingError> {
        self.armed = self.at_cpuid.take();
        Ok(())
    }

    fn cpuid_answered(&mut self, _vcpu: &mut dyn Vcpu, exit_tsc: u64) -> Result<(), ShapingError> {
        self.at_cpuid = Some(exit_tsc.wrapping_add(self.offset as u64));
        Ok(())
    }

    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, instruction: TscRead) -> Result<u64, ShapingError> {
        Ok(match (instruction, self.armed.take()) {
            (TscRead::Rdtsc | TscRead::Rdtscp, Some(at)) => at.saturating_add(self.cost.unwrap_or(0)),
            _ => read,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    fn cpuid_exit(vcpu: &mut SimVcpu, clock: &mut CpuidCost, guest: u64, handler: u64) -> u64 {
        vcpu.advance(guest);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(vcpu, exit_tsc).unwrap();
        clock.cpuid_answered(vcpu, exit_tsc).unwrap();
        vcpu.advance(handler);
        clock.exit_ended(vcpu).unwrap();
        exit_tsc
    }

    fn read_exit(vcpu: &mut SimVcpu, clock: &mut CpuidCost, guest: u64) -> u64 {
        vcpu.advance(guest);
        let exit_tsc = vcpu.host_tsc.get();
        clock.exit_began(vcpu, exit_tsc).unwrap();
        let told = clock.tsc_read(vcpu, exit_tsc, TscRead::Rdtsc).unwrap();
        clock.exit_ended(vcpu).unwrap();
        told
    }

    #[test]
    fn the_read_after_a_cpuid_is_the_cpuid_plus_the_bare_metal_cost() {
        let mut vcpu = SimVcpu::new();
        let mut clock = CpuidCost::new(Some(120));
        clock.arm(&mut vcpu).unwrap();
        let at = cpuid_exit(&mut vcpu, &mut clock, 1_000, 50_000);
        assert_eq!(read_exit(&mut vcpu, &mut clock, 30), at + 120, "whatever the exit cost");
        // Disarmed by the read: a read with no CPUID before it is the truth.
        let truth = read_exit(&mut vcpu, &mut clock, 500);
        assert_eq!(truth, vcpu.host_tsc.get());
        // Any other exit between the CPUID and the read disarms it.
        cpuid_exit(&mut vcpu, &mut clock, 100, 50_000);
        vcpu.advance(10);
        let console = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, console).unwrap();
        clock.exit_ended(&mut vcpu).unwrap();
        let after = read_exit(&mut vcpu, &mut clock, 10);
        assert_eq!(after, vcpu.host_tsc.get());
        // MSR 0x10 answers the truth, armed or not.
        let at = cpuid_exit(&mut vcpu, &mut clock, 100, 9_000);
        let msr_tsc = vcpu.host_tsc.get();
        clock.exit_began(&mut vcpu, msr_tsc).unwrap();
        assert_eq!(clock.tsc_read(&mut vcpu, msr_tsc, TscRead::Msr).unwrap(), msr_tsc);
        assert!(msr_tsc > at + 120);
    }

    #[test]
    fn the_bare_metal_cost_is_measured_here() {
        let cost = bare_metal_cpuid_cost();
        assert!(cost > 0);
    }
}
