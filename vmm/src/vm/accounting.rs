//! How many exits of each kind a run took and how long the VMM spent on each (from
//! KVM_RUN returning to the next KVM_RUN, in host TSC cycles).

use super::handler::ExitKind;
use crate::stats::{self, Reservoir};
use serde::Serialize;
use std::collections::BTreeMap;

/// Handler times kept per kind of exit: every one up to this many, then a uniform sample
/// of this size (reservoir sampling, Algorithm R), so that a guest flooding the console or
/// a port cannot grow the VMM's memory. Counts stay exact; medians are exact up to here.
pub const KEPT_PER_KIND: usize = 1 << 16;

/// One kind's handler times, in bounded memory.
type KindStats = Reservoir<u64>;

fn kind_stats(reserve: usize) -> KindStats {
    Reservoir::new(KEPT_PER_KIND, reserve, 0x0e41_7c0d)
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
            stats.kinds.insert(kind, kind_stats(count));
        }
        stats
    }

    pub fn record(&mut self, kind: ExitKind, handler_cycles: u64) {
        self.kinds
            .entry(kind)
            .or_insert_with(|| kind_stats(0))
            .record(handler_cycles);
    }

    pub fn count(&self, kind: ExitKind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.count())
    }

    /// The handler times kept (all of them up to [`KEPT_PER_KIND`]).
    pub fn handler_cycles(&self, kind: ExitKind) -> &[u64] {
        self.kinds.get(&kind).map_or(&[], |k| k.kept())
    }

    pub fn summary(&self) -> BTreeMap<String, ExitSummary> {
        self.kinds
            .iter()
            .filter(|(_, k)| k.count() > 0)
            .map(|(kind, k)| {
                let summary = ExitSummary {
                    count: k.count(),
                    handler_cycles_median: stats::median(k.kept()),
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
