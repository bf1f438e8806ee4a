//! What KVM_RUN returned, copied out of the shared `kvm_run` page so the vCPU can be used
//! again while the exit is handled.

use kvm_ioctls::VcpuExit;

/// A KVM exit, copied out of the shared `kvm_run` page so the vCPU can be used again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out`: the port and up to four bytes of data, little-endian.
    IoOut {
        port: u16,
        value: u32,
    },
    IoIn {
        port: u16,
    },
    Mmio {
        addr: u64,
    },
    /// KVM_EXIT_DEBUG: where, and which exception (1: debug, 3: breakpoint).
    Debug {
        pc: u64,
        exception: u32,
    },
    Hlt,
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR with its suberror (1: emulation failure).
    InternalError {
        suberror: u32,
    },
    FailEntry(u64),
    /// KVM_EXIT_X86_RDMSR: a read of an MSR this VMM filtered (the reply goes back
    /// through `Vcpu::reply_msr`).
    RdMsr {
        index: u32,
    },
    /// KVM_RUN returned early for a signal (the watchdog's kick).
    Interrupted,
    Other(String),
}

impl Exit {
    /// The exit as KVM names it, with what it carried.
    pub fn kvm_name(&self) -> String {
        match self {
            Exit::IoOut { port, value } => format!("KVM_EXIT_IO (out to port {port:#x}, value {value:#x})"),
            Exit::IoIn { port } => format!("KVM_EXIT_IO (in from port {port:#x})"),
            Exit::Mmio { addr } => format!("KVM_EXIT_MMIO (address {addr:#x})"),
            Exit::Debug { pc, exception } => format!(
                "KVM_EXIT_DEBUG ({} at {pc:#x})",
                match exception {
                    1 => "#DB, exception 1: a hardware breakpoint".to_owned(),
                    3 => "#BP, exception 3: an int3".to_owned(),
                    other => format!("exception {other}"),
                }
            ),
            Exit::Hlt => "KVM_EXIT_HLT".into(),
            Exit::Shutdown => "KVM_EXIT_SHUTDOWN (triple fault)".into(),
            Exit::InternalError { suberror } => format!(
                "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}{})",
                if *suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    ": emulation failure"
                } else {
                    ""
                }
            ),
            Exit::FailEntry(reason) => format!("KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x})"),
            Exit::RdMsr { index } => format!("KVM_EXIT_X86_RDMSR (MSR {index:#x})"),
            Exit::Interrupted => "KVM_EXIT_INTR (KVM_RUN interrupted by a signal)".into(),
            Exit::Other(what) => what.clone(),
        }
    }

    /// Copies an exit out of `kvm_run`. The internal error's suberror is filled in by the
    /// caller, which still holds the vCPU.
    pub fn from_kvm(exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Self {
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut value = [0u8; 4];
                let len = data.len().min(4);
                value[..len].copy_from_slice(&data[..len]);
                Exit::IoOut {
                    port,
                    value: u32::from_le_bytes(value),
                }
            }
            Ok(VcpuExit::IoIn(port, _)) => Exit::IoIn { port },
            Ok(VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _)) => Exit::Mmio { addr },
            Ok(VcpuExit::Debug(arch)) => Exit::Debug {
                pc: arch.pc,
                exception: arch.exception,
            },
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::InternalError) => Exit::InternalError { suberror: 0 },
            Ok(VcpuExit::FailEntry(reason, _)) => Exit::FailEntry(reason),
            Ok(VcpuExit::X86Rdmsr(msr)) => Exit::RdMsr { index: msr.index },
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
        }
    }
}
