//! /dev/kvm and what this process learns about it once: the supported CPUID table, how
//! registers travel at an exit, the TSC rate. Every VM of the process is built from this
//! context, so nothing that can be done once per process is done per VM.

use super::vcpu::RegisterAccess;
use crate::arch::x86_64::cpuid::{CpuidAnswers, CpuidTable};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_SYNC_X86_REGS};
use kvm_ioctls::{Cap, Kvm};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = open_hint(.0))]
    Open(kvm_ioctls::Error),
    #[error("KVM refused KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot build a vCPU's CPUID table from KVM's: {0}")]
    CpuidTable(String),
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
    /// KVM_GET_SUPPORTED_CPUID, as KVM reports it (the host's topology).
    supported: CpuidTable,
    /// The table vCPU 0 of a one-vCPU guest gets with KVM_SET_CPUID2.
    pub(super) cpuid: CpuId,
    /// The table KVM holds for vCPU 0 once it is in long mode, for one vCPU and for two,
    /// with each of an evader's CPUID answers (read back from the first VM of each: KVM adds
    /// runtime bits such as OSXSAVE, the same for every VM built alike).
    pub(super) cpuid_in_guest: [[OnceLock<CpuidTable>; CpuidAnswers::COUNT]; 2],
    pub registers: RegisterAccess,
    /// The vCPU TSC rate KVM reports (KVM_GET_TSC_KHZ), where it does.
    pub tsc_khz: Option<u32>,
    /// KVM_CAP_TSC_CONTROL: a vCPU's TSC rate can be set (KVM_SET_TSC_KHZ, TSC scaling).
    pub tsc_control: bool,
}

impl KvmContext {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        let supported = CpuidTable::from_kvm(&supported);
        let cpuid =
            topology(&supported, 0, 1, CpuidAnswers::KVM).map_err(|e| KvmError::CpuidTable(format!("{e:?}")))?;
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
            supported,
            cpuid,
            cpuid_in_guest: Default::default(),
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

    /// The table for vCPU `apic_id` of a guest of `vcpus` (one or two), saying what
    /// what `answers` asks.
    pub(super) fn cpuid_for(&self, apic_id: u32, vcpus: u32, answers: CpuidAnswers) -> Result<CpuId, KvmError> {
        let table = match (apic_id, vcpus, answers) {
            (0, 1, CpuidAnswers::KVM) => return Ok(self.cpuid.clone()),
            _ => topology(&self.supported, apic_id, vcpus, answers),
        };
        table.map_err(|e| KvmError::CpuidTable(format!("{e:?}")))
    }

    /// The same context with register access forced (the exits bench compares both).
    pub fn with_register_access(mut self, registers: RegisterAccess) -> Self {
        self.registers = registers;
        self
    }
}

/// `table` as vCPU `apic_id` of `vcpus` sees it, for KVM_SET_CPUID2.
fn topology(
    table: &CpuidTable,
    apic_id: u32,
    vcpus: u32,
    answers: CpuidAnswers,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let mut table = table.clone();
    table.set_topology(apic_id, vcpus);
    table.set_answers(answers);
    CpuId::from_entries(table.entries())
}

/// Asks KVM for its TSC rate, with one throwaway vCPU (once per process).
fn tsc_khz(kvm: &Kvm) -> Option<u32> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().filter(|&k| k > 0)
}
