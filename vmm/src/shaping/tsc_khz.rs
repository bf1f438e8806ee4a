//! `tsc-khz:N`: both vCPUs' TSC run at N kHz (KVM_SET_TSC_KHZ, where the KVM offers
//! KVM_CAP_TSC_CONTROL), as AutoVirt's TSC scaling slows the guest's clock down. Set once
//! before the run; nothing happens per exit.

use super::evasion::{EvasionKind, Needs};
use super::policy::{ExitPolicy, ShapingError};
use crate::vm::VmSetup;

pub const KIND: EvasionKind = EvasionKind {
    name: "tsc-khz",
    argument: Some("the guest TSC rate, in kHz"),
    does: "sets both vCPUs' TSC rate to N kHz (KVM_SET_TSC_KHZ, where KVM_CAP_TSC_CONTROL is offered)",
    as_in: "AutoVirt's TSC scaling",
    needs: Needs {
        tsc_control: true,
        ..Needs::NONE
    },
    check: |khz| match khz {
        100_000..=10_000_000 => Ok(()),
        _ => Err("the rate must be between 100,000 and 10,000,000 kHz"),
    },
    build: |khz| Box::new(TscKhz(khz.and_then(|k| u32::try_from(k).ok()).unwrap_or(0))),
};

/// Sets every vCPU's TSC rate before the run.
pub struct TscKhz(pub u32);

impl ExitPolicy for TscKhz {
    fn prepare(&mut self, vm: &mut dyn VmSetup) -> Result<(), ShapingError> {
        vm.set_tsc_khz(self.0).map_err(|source| ShapingError::Setup {
            policy: KIND.name,
            source: Box::new(source),
        })
    }
}
