//! `capemon-fake-rdtsc:N`: CAPE sandbox's debugger-side RDTSC, as capemon's code reads at
//! kevoreilly/capemon 8478741a1920292e4d4e0dc03c63ad2ed00791ec (`CAPE/Trace.c`
//! L1966-L1985): the first traced RDTSC reads the real TSC; every later one reads the last
//! answer plus `g_config.fake_rdtsc`. `config.c` L1143-L1146 sets that from the option
//! `fake-rdtsc=1` as `value[0] == '1'`, a boolean: the step is 1 tick (the README's
//! `fake-rdtsc=5000`, CAPEv2 #273, is not what this code parses). A clock whose every
//! delta is one value: the fixed virtual cost a noise-floor check is written for.
//!
//! Not reproduced: capemon fakes only the RDTSCs its debugger single-steps over (here
//! every trapped RDTSC of the run); RDTSCP is left alone (`nop-rdtscp` is a separate
//! option) and MSR 0x10 is never read by a user-mode sample.

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;

/// One vCPU's fixed-step clock.
#[derive(Debug)]
pub struct FixedStep {
    step: u64,
    last: Option<u64>,
}

impl FixedStep {
    pub fn new(step: u64) -> Self {
        Self { step, last: None }
    }
}

impl ExitPolicy for FixedStep {
    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, _instruction: TscRead) -> Result<u64, ShapingError> {
        let told = self.last.map_or(read, |last| last.saturating_add(self.step));
        self.last = Some(told);
        Ok(told)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    #[test]
    fn the_first_read_is_the_truth_and_every_later_one_a_step_on() {
        let mut vcpu = SimVcpu::new();
        let mut clock = FixedStep::new(1);
        assert_eq!(clock.tsc_read(&mut vcpu, 5_000_000, TscRead::Rdtsc).unwrap(), 5_000_000);
        // However long the guest ran between (a CPUID's exit, a second), one tick.
        for (n, real) in [(1, 5_000_123), (2, 9_000_000), (3, 9_000_001)] {
            assert_eq!(clock.tsc_read(&mut vcpu, real, TscRead::Rdtsc).unwrap(), 5_000_000 + n);
        }
        let mut five_thousand = FixedStep::new(5000);
        five_thousand.tsc_read(&mut vcpu, 0, TscRead::Rdtsc).unwrap();
        assert_eq!(five_thousand.tsc_read(&mut vcpu, 1, TscRead::Rdtsc).unwrap(), 5000);
    }
}
