//! Paravirtual CPUID: an enlightened guest does not execute CPUID; it asks the VMM with a
//! hypercall. Here the hypercall is port I/O (`out dx, eax` on `ports::HYPERCALL`, leaf in
//! EAX, subleaf in ECX), which every KVM delivers to userspace; the VMM answers in RAX–RDX
//! from the same table KVM would use. KVM completes the OUT (moves RIP past it) on the
//! next KVM_RUN, so RIP is left as it is.

use super::answer::{answer_cpuid, Answered, Answerer, ModeError};
use super::trap_emulate::site_at;
use crate::arch::x86_64::cpuid::CpuidTable;
use crate::vm::exit::Exit;
use crate::vm::handler::ExitKind;
use crate::vm::vcpu::Vcpu;
use guest_payload::ports;

/// `out dx, eax`: one byte, which a KVM that completed it before exiting reports RIP past.
const HYPERCALL_LEN: u64 = 1;

pub struct Paravirt {
    cpuid: CpuidTable,
    /// The snapshot's hypercall instruction, to count it apart from the timed one.
    query_site: Option<u64>,
    /// Leave the hypercall unanswered: the bare port I/O round trip (benches).
    bare: bool,
}

impl Paravirt {
    pub fn new(cpuid: CpuidTable, query_site: Option<u64>) -> Self {
        Self {
            cpuid,
            query_site,
            bare: false,
        }
    }

    /// Hypercalls taken and left unanswered, unshaped: the exit path's floor.
    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }
}

impl Answerer for Paravirt {
    fn answer(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit) -> Result<Option<Answered>, ModeError> {
        if !matches!(
            exit,
            Exit::IoOut {
                port: ports::HYPERCALL,
                ..
            }
        ) {
            return Ok(None);
        }
        if self.bare {
            return Ok(Some(Answered {
                kind: ExitKind::CpuidHypercall,
                shaped: false,
            }));
        }
        let mut regs = vcpu.regs()?;
        let rip = regs.rip;
        answer_cpuid(&self.cpuid, &mut regs);
        vcpu.set_regs(&regs)?;
        // RIP is at the one-byte `out`, or past it where KVM completed it before exiting.
        let query = self.query_site.as_slice();
        let kind = match site_at(query, rip, HYPERCALL_LEN) {
            Some(_) => ExitKind::CpuidQueryHypercall,
            None => ExitKind::CpuidHypercall,
        };
        Ok(Some(Answered { kind, shaped: true }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::ExitPath;
    use crate::shaping::Policies;
    use crate::vm::handler::{ExitHandler, Flow};
    use crate::vm::vcpu::sim::SimVcpu;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn a_hypercall_is_answered_in_place_and_the_snapshot_counted_apart() {
        let table = CpuidTable::new(vec![kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: 0x4b4d_564b,
            ..Default::default()
        }]);
        let mut handler = Paravirt::new(table, Some(0x10_0500));
        let mut vcpu = SimVcpu::new();
        handler.arm(&mut vcpu).unwrap();
        let hypercall = Exit::IoOut {
            port: ports::HYPERCALL,
            value: 0x4000_0000,
        };
        for (rip, kind) in [
            (0x10_0100, ExitKind::CpuidHypercall),
            (0x10_0500, ExitKind::CpuidQueryHypercall),
            (0x10_0501, ExitKind::CpuidQueryHypercall),
        ] {
            vcpu.regs.rip = rip;
            vcpu.regs.rax = 0x4000_0000;
            let mut path = ExitPath {
                answerer: &mut handler,
                policy: &mut Policies::none(),
                tsc_trap: None,
                console: None,
            };
            let flow = path.handle(&mut vcpu, &hypercall, 0).unwrap();
            assert_eq!(flow, Flow::Continue(kind));
            assert_eq!((vcpu.regs.rax, vcpu.regs.rbx), (0x4000_0001, 0x4b4d_564b));
            assert_eq!(vcpu.regs.rip, rip, "KVM completes the out itself");
        }
    }
}
