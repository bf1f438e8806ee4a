//! Paravirtual CPUID: an enlightened guest does not execute CPUID; it asks the VMM with a
//! hypercall. Here the hypercall is port I/O (`out dx, eax` on `ports::HYPERCALL`, leaf in
//! EAX, subleaf in ECX), which every KVM delivers to userspace; the VMM answers in RAX–RDX
//! from the same table KVM would use. KVM completes the OUT (moves RIP past it) on the
//! next KVM_RUN, so RIP is left as it is.

use super::{answer_cpuid, CpuidExitHandler, GuestContext, ModeError};
use crate::shaping::Shaper;

pub struct Paravirt {
    shaper: Shaper,
    pub hypercalls: u64,
}

impl Paravirt {
    pub fn new(shaper: Shaper) -> Self {
        Self { shaper, hypercalls: 0 }
    }

    pub fn shaper(&self) -> &Shaper {
        &self.shaper
    }
}

impl CpuidExitHandler for Paravirt {
    fn arm(&mut self, guest: &GuestContext) -> Result<(), ModeError> {
        Ok(self.shaper.arm(guest.vcpu)?)
    }

    fn on_hypercall(&mut self, guest: &GuestContext, exit_tsc: u64) -> Result<(), ModeError> {
        answer_cpuid(guest, 0)?;
        self.hypercalls += 1;
        self.shaper.after_exit(guest.vcpu, exit_tsc)?;
        Ok(())
    }
}
