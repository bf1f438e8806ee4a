//! Moving a vCPU's TSC: the per-vCPU TSC offset (KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET,
//! Linux 5.16+), or failing that the IA32_TSC MSR.
//!
//! kvm-ioctls exposes vCPU device attributes on aarch64 only, so the attribute ioctls are
//! issued on the vCPU fd directly, as Cloud Hypervisor does. Whether a write actually
//! changes what the guest reads is a separate question (a software KVM may accept and
//! ignore it): `Measurer::probe_tsc_moves` (`measure/probes.rs`) finds out by asking the guest.

use kvm_bindings::{kvm_device_attr, kvm_msr_entry, Msrs, KVMIO, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use kvm_ioctls::VcpuFd;
use serde::Serialize;
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);

const IA32_TSC: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum TscError {
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    #[error("KVM handled {handled} of 1 IA32_TSC MSR entries")]
    MsrNotHandled { handled: usize },
}

/// How the TSC is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TscMethod {
    /// KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET): exact, one ioctl.
    VcpuTscOffset,
    /// KVM_SET_MSRS(IA32_TSC): the kernel recomputes the offset from the host TSC it
    /// reads during the ioctl, so each move is off by the ioctl's entry time.
    Ia32TscMsr,
}

/// Moves one vCPU's TSC by relative amounts.
#[derive(Debug)]
pub struct TscMover {
    pub method: TscMethod,
    /// Guest TSC minus host TSC, as last set.
    offset: i64,
}

fn offset_attr(value: &mut i64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: value as *mut i64 as u64,
    }
}

fn device_attr_ioctl(
    vcpu: &VcpuFd,
    request: libc::c_ulong,
    attr: &kvm_device_attr,
    what: &'static str,
) -> Result<(), TscError> {
    // SAFETY: a vCPU fd, a request that takes a kvm_device_attr, a valid attr whose `addr`
    // (if any) points to a live u64 the kernel may read or write.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vcpu, request, attr) };
    if ret != 0 {
        return Err(TscError::Kvm {
            what,
            source: vmm_sys_util::errno::Error::last(),
        });
    }
    Ok(())
}

/// The guest's TSC minus the host's, and how far off that may be. Read through IA32_TSC
/// between two host TSC reads (five times, keeping the narrowest bracket: its half-width is
/// the uncertainty); where KVM also has the vCPU's TSC offset attribute and its value lies
/// in that bracket, it is the exact offset (uncertainty 0). An emulating KVM may keep an
/// attribute it does not apply, hence the check.
pub fn guest_offset(vcpu: &VcpuFd) -> Result<(i64, u64), TscError> {
    let mut best: Option<(i64, u64)> = None;
    for _ in 0..5 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| TscError::MsrNotHandled { handled: 0 })?;
        let before = guest_payload::timing::read_tsc();
        let handled = vcpu.get_msrs(&mut msrs).map_err(|source| TscError::Kvm {
            what: "KVM_GET_MSRS(IA32_TSC)",
            source,
        })?;
        let after = guest_payload::timing::read_tsc();
        if handled != 1 {
            return Err(TscError::MsrNotHandled { handled });
        }
        let half = after.saturating_sub(before) / 2;
        let offset = msrs.as_slice()[0].data.wrapping_sub(before + half) as i64;
        if best.is_none_or(|(_, width)| half < width) {
            best = Some((offset, half));
        }
    }
    let (offset, half) = best.ok_or(TscError::MsrNotHandled { handled: 0 })?;
    let mut exact = 0i64;
    let attr = offset_attr(&mut exact);
    if device_attr_ioctl(vcpu, KVM_HAS_DEVICE_ATTR(), &attr, "KVM_HAS_DEVICE_ATTR").is_ok()
        && device_attr_ioctl(vcpu, KVM_GET_DEVICE_ATTR(), &attr, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)").is_ok()
        && exact.abs_diff(offset) <= half
    {
        return Ok((exact, 0));
    }
    Ok((offset, half))
}

impl TscMover {
    /// Uses the vCPU TSC offset attribute where KVM has it, else the MSR.
    pub fn open(vcpu: &VcpuFd) -> Result<Self, TscError> {
        let mut offset = 0i64;
        let attr = offset_attr(&mut offset);
        if device_attr_ioctl(vcpu, KVM_HAS_DEVICE_ATTR(), &attr, "KVM_HAS_DEVICE_ATTR").is_ok() {
            device_attr_ioctl(vcpu, KVM_GET_DEVICE_ATTR(), &attr, "KVM_GET_DEVICE_ATTR(TSC_OFFSET)")?;
            return Ok(Self {
                method: TscMethod::VcpuTscOffset,
                offset,
            });
        }
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| TscError::MsrNotHandled { handled: 0 })?;
        let handled = vcpu.get_msrs(&mut msrs).map_err(|source| TscError::Kvm {
            what: "KVM_GET_MSRS(IA32_TSC)",
            source,
        })?;
        if handled != 1 {
            return Err(TscError::MsrNotHandled { handled });
        }
        let guest = msrs.as_slice()[0].data;
        let host = guest_payload::timing::read_tsc();
        Ok(Self {
            method: TscMethod::Ia32TscMsr,
            offset: guest.wrapping_sub(host) as i64,
        })
    }

    /// Makes the guest's TSC read `delta` cycles later (earlier if negative) than it
    /// otherwise would.
    pub fn move_by(&mut self, vcpu: &VcpuFd, delta: i64) -> Result<(), TscError> {
        self.offset = self.offset.wrapping_add(delta);
        match self.method {
            TscMethod::VcpuTscOffset => {
                let mut offset = self.offset;
                let attr = offset_attr(&mut offset);
                device_attr_ioctl(vcpu, KVM_SET_DEVICE_ATTR(), &attr, "KVM_SET_DEVICE_ATTR(TSC_OFFSET)")
            }
            TscMethod::Ia32TscMsr => {
                let value = guest_payload::timing::read_tsc().wrapping_add(self.offset as u64);
                let msrs = Msrs::from_entries(&[kvm_msr_entry {
                    index: IA32_TSC,
                    data: value,
                    ..Default::default()
                }])
                .map_err(|_| TscError::MsrNotHandled { handled: 0 })?;
                let handled = vcpu.set_msrs(&msrs).map_err(|source| TscError::Kvm {
                    what: "KVM_SET_MSRS(IA32_TSC)",
                    source,
                })?;
                if handled != 1 {
                    return Err(TscError::MsrNotHandled { handled });
                }
                Ok(())
            }
        }
    }
}
