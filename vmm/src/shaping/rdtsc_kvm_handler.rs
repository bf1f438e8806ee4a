//! `rdtsc-kvm-handler:N`: WCharacter/RDTSC-KVM-Handler's clock, as its code reads at
//! 247f0431a1f13cde1f2c356e13e16b52f30b10e2 (`Linux kernel/svm.c` L3140-L3174,
//! `handle_rdtsc_interception`; `Linux kernel/vmx.c` L5964-L5995, `handle_rdtsc`, with
//! 16). RDTSC is trapped; the fake TSC starts at the real one and advances by the real
//! TSC's progress since the last RDTSC divided by N (`diff / 20` on AMD, `diff / 16` on
//! Intel), and is clamped so that it never passes the real one: a guest clock that runs N
//! times slower than the host's, whatever the exits cost.
//!
//! Not reproduced: the original keeps one fake TSC in function statics shared by every
//! vCPU of every VM (here: vCPU 0's own); RDTSCP is not trapped there (it faults with #UD
//! where the guest's CPUID hides it, which its README asks for), and MSR 0x10 reads return
//! the real TSC.

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;

/// One vCPU's slowed clock.
#[derive(Debug)]
pub struct RdtscKvmHandler {
    divider: u64,
    /// The real TSC and the fake one at the last read.
    last: Option<(u64, u64)>,
}

impl RdtscKvmHandler {
    pub fn new(divider: u64) -> Self {
        Self {
            divider: divider.max(1),
            last: None,
        }
    }
}

impl ExitPolicy for RdtscKvmHandler {
    fn tsc_read(&mut self, _vcpu: &mut dyn Vcpu, read: u64, _instruction: TscRead) -> Result<u64, ShapingError> {
        let told = match self.last {
            None => read,
            Some((real, fake)) => fake.saturating_add(read.saturating_sub(real) / self.divider).min(read),
        };
        self.last = Some((read, told));
        Ok(told)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    #[test]
    fn a_million_cycle_window_reads_fifty_thousand_at_twenty() {
        let mut vcpu = SimVcpu::new();
        let mut clock = RdtscKvmHandler::new(20);
        let start = clock.tsc_read(&mut vcpu, 5_000_000, TscRead::Rdtsc).unwrap();
        assert_eq!(start, 5_000_000, "the first read is the real TSC");
        let end = clock.tsc_read(&mut vcpu, 6_000_000, TscRead::Rdtsc).unwrap();
        assert_eq!(end - start, 50_000);
        let intel = {
            let mut clock = RdtscKvmHandler::new(16);
            clock.tsc_read(&mut vcpu, 0, TscRead::Rdtsc).unwrap();
            clock.tsc_read(&mut vcpu, 1_600_000, TscRead::Rdtsc).unwrap()
        };
        assert_eq!(intel, 100_000);
    }
}
