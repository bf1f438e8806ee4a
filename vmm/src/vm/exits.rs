//! Exits: what KVM_RUN returned (copied out of `kvm_run`), the handler interface the run
//! loop hands them to, and the accounting of how many exits of each kind a run took and
//! how long the VMM spent on each (from KVM_RUN returning to the next KVM_RUN, in TSC
//! cycles).

use super::vcpu::Vcpu;
use crate::stats;
use kvm_ioctls::VcpuExit;
use serde::Serialize;
use std::collections::BTreeMap;

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
            Ok(VcpuExit::Intr) => Exit::Interrupted,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// What the run loop does after a handler looked at an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Handled: count it as this kind and re-enter the guest.
    Continue(ExitKind),
    /// The guest rang "done" with this status.
    Done { status: u32 },
    /// Not an exit the handler takes: the run ends with an error naming it.
    Fatal,
}

/// An error of a handler, kept whole so callers can look inside.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whoever handles a VM's exits (the modes, in `crate::modes`). The run loop knows no
/// mode: it hands each exit over and does what the [`Flow`] says.
pub trait ExitHandler: Send {
    /// Called once before the vCPU first runs: arm traps, patch code, open TSC moves.
    fn arm(&mut self, vcpu: &mut dyn Vcpu) -> Result<(), HandlerError>;
    /// One exit; `exit_tsc` is the host TSC read as KVM_RUN returned.
    fn handle(&mut self, vcpu: &mut dyn Vcpu, exit: &Exit, exit_tsc: u64) -> Result<Flow, HandlerError>;
}

/// Why KVM_RUN returned, in the words the reports use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitKind {
    /// A CPUID the VMM emulated after a trap (debug exit at a CPUID site).
    CpuidTrap,
    /// A paravirtual CPUID hypercall on the hypercall port.
    CpuidHypercall,
    /// A trapped CPUID of the guest's snapshot of its CPUID leaves (not a timed sample).
    CpuidQueryTrap,
    /// A hypercall of the guest's CPUID snapshot (not a timed sample).
    CpuidQueryHypercall,
    /// A byte of console output.
    Console,
    /// The guest rang the done port.
    Done,
    /// KVM_RUN interrupted by a signal (the watchdog's kick).
    Signal,
    /// Anything that ends the run with an error (faults, unknown ports, MMIO, HLT...).
    Fatal,
}

impl ExitKind {
    pub const fn name(self) -> &'static str {
        match self {
            ExitKind::CpuidTrap => "cpuid-trap",
            ExitKind::CpuidHypercall => "cpuid-hypercall",
            ExitKind::CpuidQueryTrap => "cpuid-query-trap",
            ExitKind::CpuidQueryHypercall => "cpuid-query-hypercall",
            ExitKind::Console => "console-io",
            ExitKind::Done => "done-io",
            ExitKind::Signal => "signal",
            ExitKind::Fatal => "fatal",
        }
    }
}

/// Handler times kept per kind of exit: every one up to this many, then a uniform sample
/// of this size (reservoir sampling, Algorithm R), so that a guest flooding the console or
/// a port cannot grow the VMM's memory. Counts stay exact; medians are exact up to here.
pub const KEPT_PER_KIND: usize = 1 << 16;

/// One kind's exits: how many, and the handler times kept.
#[derive(Clone, Debug)]
struct KindStats {
    count: u64,
    kept: Vec<u64>,
    rng: crate::shaping::profile::SplitMix64,
}

impl KindStats {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            count: 0,
            kept: Vec::with_capacity(capacity.min(KEPT_PER_KIND)),
            rng: crate::shaping::profile::SplitMix64::new(0x0e41_7c0d),
        }
    }

    fn record(&mut self, cycles: u64) {
        if self.kept.len() < KEPT_PER_KIND {
            self.kept.push(cycles);
        } else {
            // The n-th exit (1-based) replaces a kept one with probability KEPT / n.
            let slot = self.rng.next_u64() % (self.count + 1);
            if let Some(kept) = self.kept.get_mut(slot as usize) {
                *kept = cycles;
            }
        }
        self.count += 1;
    }
}

/// Per-kind handler times of one run, in bounded memory.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    kinds: BTreeMap<ExitKind, KindStats>,
}

/// What the reports show for one kind of exit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ExitSummary {
    pub count: u64,
    /// Median host cycles from KVM_RUN's return to the next KVM_RUN (of the kept times:
    /// exact up to [`KEPT_PER_KIND`] exits, of a uniform sample of them beyond).
    pub handler_cycles_median: u64,
}

impl ExitStats {
    /// Sizes the lists of the timed CPUID exits up front (whichever kind the mode takes),
    /// so the exit path does not reallocate while the guest is timing.
    pub fn with_expected_cpuid_exits(count: usize) -> Self {
        let mut stats = Self::default();
        for kind in [ExitKind::CpuidTrap, ExitKind::CpuidHypercall] {
            stats.kinds.insert(kind, KindStats::with_capacity(count));
        }
        stats
    }

    pub fn record(&mut self, kind: ExitKind, handler_cycles: u64) {
        self.kinds
            .entry(kind)
            .or_insert_with(|| KindStats::with_capacity(0))
            .record(handler_cycles);
    }

    pub fn count(&self, kind: ExitKind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.count)
    }

    /// The handler times kept (all of them up to [`KEPT_PER_KIND`]).
    pub fn handler_cycles(&self, kind: ExitKind) -> &[u64] {
        self.kinds.get(&kind).map_or(&[], |k| k.kept.as_slice())
    }

    pub fn summary(&self) -> BTreeMap<String, ExitSummary> {
        self.kinds
            .iter()
            .filter(|(_, k)| k.count > 0)
            .map(|(kind, k)| {
                let summary = ExitSummary {
                    count: k.count,
                    handler_cycles_median: stats::median(&k.kept),
                };
                (kind.name().to_owned(), summary)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_takes_the_median_per_kind() {
        let mut stats = ExitStats::with_expected_cpuid_exits(3);
        for cycles in [10, 30, 20] {
            stats.record(ExitKind::CpuidTrap, cycles);
        }
        stats.record(ExitKind::Done, 5);
        let summary = stats.summary();
        assert_eq!(
            summary["cpuid-trap"],
            ExitSummary {
                count: 3,
                handler_cycles_median: 20
            }
        );
        assert_eq!(summary["done-io"].count, 1);
        assert!(!summary.contains_key("console-io"));
        assert!(
            !summary.contains_key("cpuid-hypercall"),
            "preallocated but empty: not reported"
        );
    }

    #[test]
    fn a_flood_of_exits_is_counted_exactly_in_bounded_memory() {
        let mut stats = ExitStats::default();
        let flood = KEPT_PER_KIND as u64 * 4;
        for i in 0..flood {
            stats.record(ExitKind::Console, 100 + i % 2);
        }
        assert_eq!(stats.count(ExitKind::Console), flood);
        assert_eq!(stats.handler_cycles(ExitKind::Console).len(), KEPT_PER_KIND);
        // A uniform sample of a half-100, half-101 stream has its median in it.
        assert!([100, 101].contains(&stats.summary()["console-io"].handler_cycles_median));
    }
}
