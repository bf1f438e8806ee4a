//! Paravirtual CPUID: an enlightened guest does not execute CPUID; it asks the VMM with a
//! hypercall. Here the hypercall is port I/O (`out dx, eax` on `ports::HYPERCALL`, leaf in
//! EAX, subleaf in ECX), which every KVM delivers to userspace; the VMM answers in RAX–RDX
//! from the same table KVM would use. KVM completes the OUT (moves RIP past it) on the
//! next KVM_RUN, so RIP is left as it is.

use super::{answer_cpuid, CpuidExitHandler, GuestContext, ModeError};
use crate::shaping::Shaper;
use crate::vm::exits::ExitKind;
use guest_payload::timing::HYPERCALL_QUERY_SITE_SYMBOL;

pub struct Paravirt {
    shaper: Shaper,
    /// The snapshot's hypercall instruction, to count it apart from the timed one.
    query_site: Option<u64>,
}

impl Paravirt {
    pub fn new(shaper: Shaper) -> Self {
        Self {
            shaper,
            query_site: None,
        }
    }
}

impl CpuidExitHandler for Paravirt {
    fn shaper(&self) -> Option<&Shaper> {
        Some(&self.shaper)
    }

    fn arm(&mut self, guest: &GuestContext) -> Result<(), ModeError> {
        self.query_site = guest.payload.symbol(HYPERCALL_QUERY_SITE_SYMBOL);
        Ok(self.shaper.arm(guest.vcpu)?)
    }

    fn on_hypercall(&mut self, guest: &GuestContext, exit_tsc: u64) -> Result<ExitKind, ModeError> {
        let rip = answer_cpuid(guest, 0)?;
        self.shaper.after_exit(guest.vcpu, exit_tsc)?;
        // RIP is at the one-byte `out`, or past it where KVM completed it before exiting.
        let is_query = self.query_site.is_some_and(|site| rip == site || rip == site + 1);
        Ok(if is_query {
            ExitKind::CpuidQueryHypercall
        } else {
            ExitKind::CpuidHypercall
        })
    }
}
