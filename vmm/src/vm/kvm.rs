//! /dev/kvm and what this process learns about it once: the supported CPUID table, how
//! registers travel at an exit, the TSC rate. Every VM of the process is built from this
//! context, so nothing that can be done once per process is done per VM.

use super::vcpu::RegisterAccess;
use crate::arch::x86_64::cpuid::CpuidTable;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYNC_X86_REGS};
use kvm_ioctls::{Cap, Kvm};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = open_hint(.0))]
    Open(kvm_ioctls::Error),
    #[error("KVM refused KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

fn open_hint(error: &kvm_ioctls::Error) -> &'static str {
    match error.errno() {
        libc::ENOENT => " (no /dev/kvm: load the kvm module for your CPU, kvm_intel or kvm_amd, and enable VT-x/AMD-V in the firmware)",
        libc::EACCES | libc::EPERM => " (permission denied: add yourself to the group that owns /dev/kvm, e.g. `sudo usermod -aG kvm $USER`, then log in again)",
        _ => "",
    }
}

/// /dev/kvm, opened once, with what every VM needs from it.
pub struct KvmContext {
    pub kvm: Kvm,
    /// KVM_GET_SUPPORTED_CPUID, normalised for a one-vCPU guest: what KVM_SET_CPUID2 gets.
    pub(super) cpuid: CpuId,
    /// The table KVM holds once a vCPU is in long mode (read back from the first VM:
    /// KVM adds runtime bits such as OSXSAVE, the same for every VM built alike).
    pub(super) cpuid_in_guest: OnceLock<CpuidTable>,
    pub registers: RegisterAccess,
    /// The vCPU TSC rate KVM reports (KVM_GET_TSC_KHZ), where it does.
    pub tsc_khz: Option<u32>,
    /// KVM_CAP_TSC_CONTROL: a vCPU's TSC rate can be set (KVM_SET_TSC_KHZ, TSC scaling).
    pub tsc_control: bool,
}

impl KvmContext {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        let mut table = CpuidTable::from_kvm(&cpuid);
        table.normalise_for_single_vcpu();
        for (slot, entry) in cpuid.as_mut_slice().iter_mut().zip(table.entries()) {
            *slot = *entry;
        }
        let sync_fields = kvm.check_extension_int(Cap::SyncRegs);
        let registers = if sync_fields > 0 && (sync_fields as u32) & KVM_SYNC_X86_REGS != 0 {
            RegisterAccess::SyncRegs
        } else {
            RegisterAccess::Ioctls
        };
        let tsc_khz = tsc_khz(&kvm);
        let tsc_control = kvm.check_extension(Cap::TscControl);
        Ok(Self {
            kvm,
            cpuid,
            cpuid_in_guest: OnceLock::new(),
            registers,
            tsc_khz,
            tsc_control,
        })
    }

    /// Does the guest's CPUID table advertise RDTSCP (CPUID.80000001H:EDX[27])? What a
    /// detector checks before it executes the instruction.
    pub fn guest_advertises_rdtscp(&self) -> bool {
        CpuidTable::from_kvm(&self.cpuid).lookup(0x8000_0001, 0)[3] & (1 << 27) != 0
    }

    /// The same context with register access forced (the exits bench compares both).
    pub fn with_register_access(mut self, registers: RegisterAccess) -> Self {
        self.registers = registers;
        self
    }
}

/// Asks KVM for its TSC rate, with one throwaway vCPU (once per process).
fn tsc_khz(kvm: &Kvm) -> Option<u32> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().filter(|&k| k > 0)
}
