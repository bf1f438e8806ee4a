//! Exit accounting: how many exits of each kind a run took, and how long the VMM spent
//! handling each (from KVM_RUN returning to the next KVM_RUN, in TSC cycles).

use crate::stats;
use serde::Serialize;
use std::collections::BTreeMap;

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

/// Per-kind handler times of one run.
#[derive(Clone, Debug, Default)]
pub struct ExitStats {
    handler_cycles: BTreeMap<ExitKind, Vec<u64>>,
}

/// What the reports show for one kind of exit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ExitSummary {
    pub count: u64,
    /// Median host cycles from KVM_RUN's return to the next KVM_RUN.
    pub handler_cycles_median: u64,
}

impl ExitStats {
    /// Sizes the lists of the timed CPUID exits up front (whichever kind the mode takes),
    /// so the exit path does not reallocate while the guest is timing.
    pub fn with_expected_cpuid_exits(count: usize) -> Self {
        let mut stats = Self::default();
        for kind in [ExitKind::CpuidTrap, ExitKind::CpuidHypercall] {
            stats.handler_cycles.insert(kind, Vec::with_capacity(count));
        }
        stats
    }

    pub fn record(&mut self, kind: ExitKind, handler_cycles: u64) {
        self.handler_cycles.entry(kind).or_default().push(handler_cycles);
    }

    pub fn count(&self, kind: ExitKind) -> u64 {
        self.handler_cycles.get(&kind).map_or(0, |v| v.len() as u64)
    }

    pub fn handler_cycles(&self, kind: ExitKind) -> &[u64] {
        self.handler_cycles.get(&kind).map_or(&[], |v| v.as_slice())
    }

    pub fn summary(&self) -> BTreeMap<String, ExitSummary> {
        self.handler_cycles
            .iter()
            .filter(|(_, cycles)| !cycles.is_empty())
            .map(|(kind, cycles)| {
                let summary = ExitSummary {
                    count: cycles.len() as u64,
                    handler_cycles_median: stats::median(cycles),
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
}
