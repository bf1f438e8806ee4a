//! Hardware-assisted CPUID: the guest's CPUID exits to KVM, which answers from the table
//! set with KVM_SET_CPUID2 and re-enters the guest without involving userspace. The VMM
//! has nothing to answer, which is the point: this is the cost of an ordinary VM.

use super::answer::{Answered, Answerer, ModeError};
use crate::vm::exit::Exit;
use crate::vm::vcpu::Vcpu;

pub struct HwAssist;

impl Answerer for HwAssist {
    fn answer(&mut self, _vcpu: &mut dyn Vcpu, _exit: &Exit) -> Result<Option<Answered>, ModeError> {
        Ok(None)
    }
}
