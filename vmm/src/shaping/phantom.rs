//! `scaled-at-user`: Hypervisor-Phantom's VMX RDTSC patch, as its code reads at
//! 2f3721494f2dc153995c82be3b6ef724e951f69f (`patches/Kernel/Archive/zen-6.14.10-vmx.patch`
//! at Scrut1ny/Hypervisor-Phantom c4abb5041084d77a11e247e4469e7efaac60846e). RDTSC exiting
//! is forced on (L48-L55, L118); each RDTSC answers `kvm_scale_tsc(rdtsc(), ratio) +
//! tsc_offset` with the scaling ratio divided by 8 when the guest's CPL is not 0 or it is
//! not in protected mode (L65-L79): in user mode the *value* (not only the rate) is an
//! eighth of the host TSC, plus the offset; at CPL 0 it is the guest's own TSC. No state,
//! no clamp: a guest that reads at CPL 3 and then at CPL 0 sees the clock jump. Reads of
//! MSR 0x10 are scaled alike (L136-L145); RDTSCP puts the VPID in RCX (L81-L84).
//!
//! Here: the divider is the file's (`divider`, 8); the host TSC is the one as KVM_RUN
//! returned; RDTSCP's RCX is 0 (this VMM enables no VPID it could name); every payload of
//! this testbed runs at CPL 0 in long mode, where the original, and so this clock, tells
//! the truth.

use super::policy::{ExitPolicy, ShapingError, TscRead};
use crate::vm::vcpu::Vcpu;

/// One vCPU's user-mode scaling.
#[derive(Debug)]
pub struct ScaledAtUser {
    divider: u64,
    /// The guest's TSC minus the host's (`arm`).
    offset: i64,
}

impl ScaledAtUser {
    pub fn new(divider: u64) -> Self {
        Self {
            divider: divider.max(1),
            offset: 0,
        }
    }
}

impl ExitPolicy for ScaledAtUser {
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), ShapingError> {
        self.offset = vcpu.tsc_offset()?;
        Ok(())
    }

    fn tsc_read(&mut self, vcpu: &mut dyn Vcpu, read: u64, _instruction: TscRead) -> Result<u64, ShapingError> {
        if vcpu.cpl()? == 0 {
            return Ok(read);
        }
        let host = read.wrapping_sub(self.offset as u64);
        Ok((host / self.divider).wrapping_add(self.offset as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vcpu::sim::SimVcpu;

    #[test]
    fn user_mode_reads_an_eighth_of_the_host_tsc_and_the_kernel_the_truth() {
        let mut vcpu = SimVcpu::new();
        vcpu.tsc_offset = -1_000;
        let mut clock = ScaledAtUser::new(8);
        clock.arm(&mut vcpu).unwrap();
        let truth = 8_000_000 - 1_000;
        assert_eq!(clock.tsc_read(&mut vcpu, truth, TscRead::Rdtsc).unwrap(), truth);
        vcpu.cpl = 3;
        assert_eq!(
            clock.tsc_read(&mut vcpu, truth, TscRead::Rdtsc).unwrap(),
            1_000_000 - 1_000,
            "the value, not only the rate"
        );
        assert_eq!(clock.tsc_read(&mut vcpu, truth, TscRead::Msr).unwrap(), 999_000);
    }
}
