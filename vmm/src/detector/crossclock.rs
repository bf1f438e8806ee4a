//! Rules that compare the clocks a guest can read with one another: RDTSC against IA32_TSC
//! (MSR 0x10) and against RDTSCP (the same counter, read three ways: an evader may trap
//! one way and not another), against MPERF (reference cycles, never ahead of the TSC), the
//! TSC against the PM timer (a wall clock the VMM keeps from the host's) and against the
//! rate kvmclock states, and vmcheck's two TSC checks, which need a wall clock to calibrate. Each reads the clocks at the two ends of the run's
//! quiet span (no CPUID) and of its probes (every CPUID window), and says which pair
//! disagreed and by how much.
//!
//! vmcheck is cited from SamuelTulach/vmcheck b1751e9 `vmcheck/vmcheck/main.c`.

use super::rules::{confidence_from, verdict};
use super::verdict::{Evidence, RuleVerdict, Verdict};
use crate::results::{ClockRecord, ClockSnapshot};
use guest_payload::clocks::{self, PM_TIMER_HZ};
use guest_payload::Probe;

/// The names of this module's rules (each registered once in [`super::RULES`]).
pub const TSC_MSR: &str = "tsc-msr";
pub const TSC_RDTSCP: &str = "tsc-rdtscp";
pub const TSC_MPERF: &str = "tsc-mperf";
pub const TSC_PM_CPUID: &str = "tsc-pm-cpuid";
pub const TSC_KVMCLOCK_RATE: &str = "tsc-kvmclock-rate";
pub const VMCHECK_RDTSC: &str = "vmcheck-rdtsc";
pub const VMCHECK_MSR: &str = "vmcheck-msr";

/// RDTSC, RDTSCP and MSR 0x10 are one counter: over a whole run (seconds) their advances
/// differ by the cost of one read at each end, far under this share.
pub const TSC_MSR_TOLERANCE: f64 = 0.01;
/// MPERF counts at the TSC's rate while the core is in C0 and stops outside it (Intel SDM
/// vol. 3 §15.2; AMD APM vol. 2 §17.3): it may fall behind the TSC, never run ahead of it
/// (the guest reads MPERF inside the TSC's reads at both ends); this share is rounding.
pub const MPERF_AHEAD_TOLERANCE: f64 = 0.01;
/// The TSC's rate against the PM timer over the run (seconds) may differ from kvmclock's
/// statement by the PM timer's reads at the ends (an exit each) and its 279 ns resolution:
/// 0.0-0.4% measured on kvm_pvm.
pub const TSC_RATE_TOLERANCE: f64 = 0.05;
/// The quiet span is short (2^27 cycles, ~55 ms): a VMM thread descheduled between the
/// guest's last TSC read and its PM timer exit adds to the PM timer alone. On a loaded
/// 2-core host 0.3-0.8% was typical and one run in two under a parallel test suite was
/// past 5%; hiders lose 17-100% (docs/detector.md).
pub const QUIET_RATE_TOLERANCE: f64 = 0.10;
/// vmcheck's thresholds (main.c L70, L127): 100,000 × the TSC's time over 25,000 CPUID
/// windows in seconds.
pub const VMCHECK_RDTSC_THRESHOLD: u64 = 200;
pub const VMCHECK_MSR_THRESHOLD: u64 = 300;
/// vmcheck's loop (main.c L51, L110).
const VMCHECK_WINDOWS: u64 = 25_000;

fn unsure(rule: &'static str, why: String) -> RuleVerdict {
    verdict(rule, Verdict::Unsure, 0.0, 0.0, why)
}

/// PM timer ticks from `a` to `b` (a 32-bit count: wrapped once at most in a run).
fn pm_ticks(a: &ClockSnapshot, b: &ClockSnapshot) -> u64 {
    u64::from((b.pm_timer as u32).wrapping_sub(a.pm_timer as u32))
}

/// The clocks of the run, or why a rule cannot read `needed` of them.
fn clocks_with(evidence: &Evidence, needed: u32, what: &str) -> Result<ClockRecord, String> {
    let record = evidence
        .clocks
        .ok_or("the run read no clocks besides the TSC (an SDK payload, or an older guest)")?;
    let missing = needed & !record.read;
    if missing != 0 {
        return Err(format!("this run could not read {what}: {}", why_unread(missing)));
    }
    Ok(record)
}

/// Why a clock of `missing` ([`clocks`] bits) was not read, by the first one missing.
fn why_unread(missing: u32) -> &'static str {
    if missing & clocks::RDTSCP != 0 {
        "this KVM stops a guest at rdtscp (vmm doctor: \"rdtscp in a guest\"), the guest's CPUID says it has none (an evader hid it, or KVM does not advertise it), or this CPU has none"
    } else if missing & clocks::APERF_MPERF != 0 {
        "KVM answers a guest's APERF and MPERF reads with #GP; only an evader that serves them (autovirt-aperfmperf) makes them readable, and a host process reads no MSR"
    } else if missing & clocks::KVMCLOCK != 0 {
        "KVM did not take the kvmclock MSR write, or a host process, which has no kvmclock"
    } else {
        "a host process reads the TSC, RDTSCP and the monotonic clock only"
    }
}

/// `counter`'s rate in Hz over `span`, against the PM timer: zero for a counter that
/// stood still (or ran back), `None` where the PM timer did not move.
fn rate_hz(span: &[ClockSnapshot; 2], counter: fn(&ClockSnapshot) -> u64) -> Option<f64> {
    let ticks = pm_ticks(&span[0], &span[1]);
    let advanced = (counter(&span[1]).wrapping_sub(counter(&span[0])) as i64).max(0);
    (ticks > 0).then(|| advanced as f64 * PM_TIMER_HZ as f64 / ticks as f64)
}

/// Below this rate against the PM timer a TSC stands still: no x86 TSC runs under
/// 1 MHz (the slowest invariant TSCs run at hundreds of MHz).
const STANDING_HZ: f64 = 1e6;

/// How far apart two figures are, as a share of the second.
fn off_by(measured: f64, reference: f64) -> f64 {
    (measured / reference - 1.0).abs()
}

/// RDTSC against IA32_TSC over the run's span: one counter read two ways. An RDTSC trap
/// that answers from its own clock (BetterTiming, a divider) and leaves the MSR alone
/// drifts from it. Score: RDTSC's advance / the MSR's.
pub fn tsc_msr(evidence: &Evidence) -> RuleVerdict {
    one_counter_two_ways(evidence, TSC_MSR, clocks::MSR_TSC, "MSR 0x10", |c| c.msr_tsc)
}

/// RDTSC against RDTSCP over the run's span: the same counter. Most RDTSC traps of the
/// zoo leave RDTSCP alone (BetterTiming, RDTSC-KVM-Handler, KVM-RDTSC-SHIELD: each says
/// so); one that traps both may answer them from different clocks (Hypervisor-Phantom's
/// RDTSCP closes a tenth of its gap at a time). Score: RDTSC's advance / RDTSCP's.
pub fn tsc_rdtscp(evidence: &Evidence) -> RuleVerdict {
    one_counter_two_ways(evidence, TSC_RDTSCP, clocks::RDTSCP, "RDTSCP", |c| c.rdtscp)
}

fn one_counter_two_ways(
    evidence: &Evidence,
    rule: &'static str,
    bit: u32,
    other: &str,
    read: fn(&ClockSnapshot) -> u64,
) -> RuleVerdict {
    let record = match clocks_with(evidence, clocks::TSC | bit, other) {
        Ok(record) => record,
        Err(why) => return unsure(rule, why),
    };
    let [a, b] = record.span;
    let (tsc, theirs) = (b.tsc.wrapping_sub(a.tsc) as i64, read(&b).wrapping_sub(read(&a)) as i64);
    if theirs <= 0 && tsc <= 0 {
        return verdict(
            rule,
            Verdict::Native,
            1.0,
            0.0,
            format!(
                "over the run RDTSC advanced {tsc} cycles and {other} {theirs}: they agree, both standing still over {:.1} ms of the PM timer (one clock answers both; tsc-pm-cpuid judges a clock that stands)",
                pm_ticks(&a, &b) as f64 * 1e3 / PM_TIMER_HZ as f64
            ),
        );
    }
    if theirs <= 0 {
        return verdict(
            rule,
            Verdict::Virtual,
            tsc as f64,
            1.0,
            format!(
                "over the run RDTSC advanced {tsc} cycles and {other} {theirs}: one counter read two ways disagrees"
            ),
        );
    }
    let ratio = tsc as f64 / theirs as f64;
    let apart = (ratio - 1.0).abs() > TSC_MSR_TOLERANCE;
    let why = format!(
        "over the run RDTSC advanced {tsc} cycles and {other} {theirs} ({:+.2}%): {}",
        (ratio - 1.0) * 100.0,
        if apart {
            format!("one counter read two ways disagrees: RDTSC (or {other}) is answered from another clock")
        } else {
            "they agree (one counter; apart from 1%)".to_string()
        }
    );
    let v = if apart { Verdict::Virtual } else { Verdict::Native };
    let confidence = confidence_from((ratio - 1.0).abs() / TSC_MSR_TOLERANCE - 1.0, 1.0);
    verdict(rule, v, ratio, confidence, why)
}

/// MPERF against RDTSC over the run's span: reference cycles, counted at the TSC's rate
/// while the core runs and not at all while it sleeps, so never ahead of the TSC. A TSC
/// slowed or hidden behind an evader's back while MPERF keeps counting (passed through, as
/// AutoVirt's QEMU patch does) falls behind it. Score: MPERF's advance / RDTSC's.
pub fn tsc_mperf(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = TSC_MPERF;
    let record = match clocks_with(evidence, clocks::TSC | clocks::APERF_MPERF, "APERF and MPERF") {
        Ok(record) => record,
        Err(why) => return unsure(RULE, why),
    };
    let [a, b] = record.span;
    let (tsc, mperf) = (b.tsc.wrapping_sub(a.tsc) as i64, b.mperf.wrapping_sub(a.mperf) as i64);
    if mperf < 0 {
        return verdict(
            RULE,
            Verdict::Virtual,
            mperf as f64,
            1.0,
            format!(
                "over the run MPERF went back {} cycles: no core's reference count runs backwards",
                -mperf
            ),
        );
    }
    if tsc <= 0 {
        let v = if mperf > 0 { Verdict::Virtual } else { Verdict::Unsure };
        return verdict(
            RULE,
            v,
            0.0,
            if mperf > 0 { 1.0 } else { 0.0 },
            format!(
                "over the run RDTSC advanced {tsc} cycles and MPERF {mperf}: {}",
                if mperf > 0 {
                    "reference cycles counted while the TSC stood still (a TSC answered from another clock)"
                } else {
                    "neither moved: nothing to compare"
                }
            ),
        );
    }
    let ratio = mperf as f64 / tsc as f64;
    let ahead = ratio - 1.0 > MPERF_AHEAD_TOLERANCE;
    let why = format!(
        "over the run MPERF advanced {mperf} cycles and RDTSC {tsc} (MPERF {:+.2}%): {}",
        (ratio - 1.0) * 100.0,
        if ahead {
            "reference cycles ran ahead of the TSC they count at: the TSC lost time (hidden exits, a divider)"
        } else {
            "MPERF not ahead of the TSC (it may fall behind: it stops while the core sleeps)"
        }
    );
    let v = if ahead { Verdict::Virtual } else { Verdict::Native };
    let confidence = confidence_from((ratio - 1.0) / MPERF_AHEAD_TOLERANCE - 1.0, 1.0);
    verdict(RULE, v, ratio, confidence, why)
}

/// The TSC's rate against the PM timer around every CPUID window (the run's span) and
/// where there is none (the quiet span): a TSC that loses time over exits (hidden by an
/// offset or by a trapped RDTSC) runs slow only in the first. Score: span rate / quiet.
pub fn tsc_pm_cpuid(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = TSC_PM_CPUID;
    let record = match clocks_with(evidence, clocks::TSC | clocks::PM_TIMER, "the PM timer") {
        Ok(record) => record,
        Err(why) => return unsure(RULE, why),
    };
    let (Some(quiet), Some(around)) = (rate_hz(&record.quiet, |c| c.tsc), rate_hz(&record.span, |c| c.tsc)) else {
        return unsure(RULE, "a span over which the PM timer did not advance".into());
    };
    if quiet < STANDING_HZ || around < STANDING_HZ {
        return verdict(
            RULE,
            Verdict::Virtual,
            if quiet > 0.0 { around / quiet } else { 0.0 },
            1.0,
            format!(
                "against the PM timer the TSC ran at {:.3} MHz around the CPUID windows and {:.3} MHz with none: a TSC that stands still (no x86 TSC runs under 1 MHz)",
                around / 1e6,
                quiet / 1e6
            ),
        );
    }
    let ratio = around / quiet;
    let apart = off_by(around, quiet) > QUIET_RATE_TOLERANCE;
    let why = format!(
        "against the PM timer the TSC ran at {:.1} MHz around the CPUID windows and {:.1} MHz with none ({:+.1}%): {}",
        around / 1e6,
        quiet / 1e6,
        (ratio - 1.0) * 100.0,
        if apart {
            "the TSC's rate depends on the exits (time hidden from it, or added)"
        } else {
            "the same rate (apart from 10%)"
        }
    );
    let v = if apart { Verdict::Virtual } else { Verdict::Native };
    let confidence = confidence_from((ratio - 1.0).abs() / QUIET_RATE_TOLERANCE - 1.0, 1.0);
    verdict(RULE, v, ratio, confidence, why)
}

/// The TSC's rate against the PM timer over the run, against the rate kvmclock states
/// (KVM's own figure, from the host): a TSC divided, scaled or hidden behind KVM's back
/// (an RDTSC trap's clock) runs at another rate than KVM says. Score: measured / stated.
pub fn tsc_kvmclock_rate(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = TSC_KVMCLOCK_RATE;
    let record = match clocks_with(evidence, clocks::TSC | clocks::PM_TIMER | clocks::KVMCLOCK, "kvmclock") {
        Ok(record) => record,
        Err(why) => return unsure(RULE, why),
    };
    let Some(measured) = rate_hz(&record.span, |c| c.tsc) else {
        return unsure(RULE, "a run over which the PM timer did not advance".into());
    };
    let stated = f64::from(record.kvmclock_tsc_khz) * 1000.0;
    if stated <= 0.0 {
        return unsure(RULE, "kvmclock states no TSC rate".into());
    }
    let ratio = measured / stated;
    let apart = off_by(measured, stated) > TSC_RATE_TOLERANCE;
    let why = format!(
        "against the PM timer the TSC ran at {:.1} MHz over the run; kvmclock says {:.1} MHz ({:+.1}%): {}",
        measured / 1e6,
        stated / 1e6,
        (ratio - 1.0) * 100.0,
        if apart {
            "the guest's TSC is not the one KVM keeps (an RDTSC trap's clock)"
        } else {
            "the rate KVM states (apart from 5%)"
        }
    );
    let v = if apart { Verdict::Virtual } else { Verdict::Native };
    let confidence = confidence_from((ratio - 1.0).abs() / TSC_RATE_TOLERANCE - 1.0, 1.0);
    verdict(RULE, v, ratio, confidence, why)
}

/// vmcheck's figure: `100000 * total / calibration` (main.c L68, L125), where `total` is
/// the counter's cycles over 25,000 windows (here the run's windows' mean × 25,000) and
/// `calibration` its cycles in one second (here its rate over the quiet span against the
/// PM timer, in place of a one-second sleep: the guest has no scheduler to sleep in).
fn vmcheck_figure(samples: &[i64], hz: f64) -> u64 {
    let n = samples.len().max(1) as i128;
    let sum: i128 = samples.iter().map(|&s| i128::from(s)).sum();
    let total = (sum * i128::from(VMCHECK_WINDOWS) / n).max(0) as f64;
    (100_000.0 * total / hz) as u64
}

fn vmcheck(
    evidence: &Evidence,
    rule: &'static str,
    probe: Probe,
    counter: fn(&ClockSnapshot) -> u64,
    needed: u32,
    threshold: u64,
    read: &str,
) -> RuleVerdict {
    let record = match clocks_with(evidence, needed, "the clocks vmcheck calibrates with") {
        Ok(record) => record,
        Err(why) => return unsure(rule, why),
    };
    let Some(samples) = evidence.samples.get(&probe).filter(|s| !s.is_empty()) else {
        return unsure(rule, format!("no {} samples in this run", probe.name()));
    };
    let Some(hz) = rate_hz(&record.quiet, counter).filter(|&hz| hz > 0.0) else {
        return unsure(
            rule,
            "a quiet span over which the counter or the PM timer did not advance: nothing to calibrate by".into(),
        );
    };
    let figure = vmcheck_figure(samples, hz);
    let fail = figure > threshold;
    let why = format!(
        "{read} over CPUID(0), 25,000 windows' worth against one second of it ({:.1} MHz by the PM timer): {figure} {} {threshold}",
        hz / 1e6,
        if fail { ">" } else { "<=" }
    );
    let v = if fail { Verdict::Virtual } else { Verdict::Native };
    let confidence = confidence_from(((figure.max(1)) as f64 / threshold as f64).ln(), 0.3);
    verdict(rule, v, figure as f64, confidence, why)
}

/// vmcheck `RdtscTiming` (main.c L21-L71): `rdtsc; cpuid(0); rdtsc` with no fence (the
/// `cpuid-unfenced` probe), VM above 200.
pub fn vmcheck_rdtsc(evidence: &Evidence) -> RuleVerdict {
    vmcheck(
        evidence,
        VMCHECK_RDTSC,
        Probe::CpuidUnfenced,
        |c| c.tsc,
        clocks::TSC | clocks::PM_TIMER,
        VMCHECK_RDTSC_THRESHOLD,
        "RDTSC",
    )
}

/// vmcheck `TimestampTiming` (main.c L74-L128): the same with MSR 0x10 (the `msr-cpuid`
/// probe), VM above 300.
pub fn vmcheck_msr(evidence: &Evidence) -> RuleVerdict {
    vmcheck(
        evidence,
        VMCHECK_MSR,
        Probe::MsrCpuid,
        |c| c.msr_tsc,
        clocks::MSR_TSC | clocks::PM_TIMER,
        VMCHECK_MSR_THRESHOLD,
        "MSR 0x10",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::ProbeSamples;

    const GHZ: u64 = 2_000_000_000;

    /// Clocks over a quiet span of 50 ms and a run of 2 s: the TSC at 2 GHz, except that
    /// over the run RDTSC saw `tsc_share` of it and MSR 0x10 `msr_share`; kvmclock states
    /// `stated_khz`; the quiet TSC runs at `quiet_share` of 2 GHz.
    fn record(tsc_share: f64, msr_share: f64, quiet_share: f64, stated_khz: u32) -> ClockRecord {
        let at = |seconds: f64, tsc_rate: f64, msr_rate: f64| ClockSnapshot {
            tsc: 1_000_000 + (seconds * tsc_rate * GHZ as f64) as u64,
            msr_tsc: 1_000_000 + (seconds * msr_rate * GHZ as f64) as u64,
            pm_timer: (seconds * PM_TIMER_HZ as f64) as u64 % (1 << 32),
            kvmclock_ns: (seconds * 1e9) as u64,
            // RDTSCP and MPERF: the true counter, at 2 GHz, from the same start.
            rdtscp: 1_000_000 + (seconds * msr_rate * GHZ as f64) as u64,
            aperf: 0,
            mperf: 1_000_000 + (seconds * msr_rate * GHZ as f64) as u64,
        };
        let quiet = [at(0.0, quiet_share, quiet_share), at(0.05, quiet_share, quiet_share)];
        let start = at(0.05, quiet_share, quiet_share);
        let end = ClockSnapshot {
            tsc: start.tsc + (2.0 * tsc_share * GHZ as f64) as u64,
            msr_tsc: start.msr_tsc + (2.0 * msr_share * GHZ as f64) as u64,
            pm_timer: (start.pm_timer + 2 * PM_TIMER_HZ) % (1 << 32),
            kvmclock_ns: start.kvmclock_ns + 2_000_000_000,
            rdtscp: start.rdtscp + 2 * GHZ,
            aperf: 0,
            mperf: start.mperf + 2 * GHZ,
        };
        ClockRecord {
            read: clocks::TSC
                | clocks::MSR_TSC
                | clocks::PM_TIMER
                | clocks::KVMCLOCK
                | clocks::RDTSCP
                | clocks::APERF_MPERF,
            kvmclock_tsc_khz: stated_khz,
            quiet,
            span: [start, end],
        }
    }

    fn evidence(samples: &ProbeSamples, clocks: ClockRecord) -> Evidence<'_> {
        Evidence {
            samples,
            ticks: samples,
            counter_rate: None,
            cpuid: &[],
            site_bytes: &[],
            tsc_khz: 2_000_000,
            cpuid_leaf: 0,
            payload: None,
            patched_for_an_evader: None,
            clocks: Some(clocks),
        }
    }

    #[test]
    fn clear_clocks_agree_and_every_rule_says_native() {
        let samples = ProbeSamples::new();
        let e = evidence(&samples, record(1.0, 1.0, 1.0, 2_000_000));
        for v in [tsc_msr(&e), tsc_pm_cpuid(&e), tsc_kvmclock_rate(&e)] {
            assert_eq!(v.verdict, Verdict::Native, "{}: {}", v.rule, v.why);
        }
    }

    #[test]
    fn a_hider_of_exits_is_caught_by_every_clock_it_leaves_alone() {
        // RDTSC lost 40% of the run (the exits); the MSR and the quiet span did not.
        let samples = ProbeSamples::new();
        let e = evidence(&samples, record(0.6, 1.0, 1.0, 2_000_000));
        let msr = tsc_msr(&e);
        assert_eq!(msr.verdict, Verdict::Virtual, "{}", msr.why);
        assert!(msr.why.contains("-40.00%"), "{}", msr.why);
        assert_eq!(tsc_pm_cpuid(&e).verdict, Verdict::Virtual);
        assert_eq!(tsc_kvmclock_rate(&e).verdict, Verdict::Virtual);
        // An evader that answers MSR 0x10 from the same clock fools that pair only.
        let both = evidence(&samples, record(0.6, 0.6, 1.0, 2_000_000));
        assert_eq!(tsc_msr(&both).verdict, Verdict::Native);
        assert_eq!(tsc_pm_cpuid(&both).verdict, Verdict::Virtual);
    }

    #[test]
    fn a_divider_is_caught_by_kvmclocks_rate_and_the_msr() {
        // RDTSC-KVM-Handler: the TSC at 1/20 everywhere, quiet or not; the MSR untouched.
        let samples = ProbeSamples::new();
        let e = evidence(&samples, record(0.05, 1.0, 0.05, 2_000_000));
        let rate = tsc_kvmclock_rate(&e);
        assert_eq!(rate.verdict, Verdict::Virtual, "{}", rate.why);
        assert!(
            rate.why.contains("100.0 MHz") && rate.why.contains("2000.0 MHz"),
            "{}",
            rate.why
        );
        assert_eq!(tsc_msr(&e).verdict, Verdict::Virtual);
        // Its rate is the same around CPUIDs as without: that rule is fooled, as it should be.
        assert_eq!(tsc_pm_cpuid(&e).verdict, Verdict::Native);
    }

    #[test]
    fn a_clock_that_stands_still_is_caught_against_the_pm_timer_and_the_pair_agrees() {
        // BetterTiming with every exit tagged: RDTSC and MSR 0x10 never advance.
        let samples = ProbeSamples::new();
        let e = evidence(&samples, record(0.0, 0.0, 0.0, 2_000_000));
        let standing = tsc_pm_cpuid(&e);
        assert_eq!(standing.verdict, Verdict::Virtual, "{}", standing.why);
        assert!(standing.why.contains("stands still"), "{}", standing.why);
        assert_eq!(tsc_kvmclock_rate(&e).verdict, Verdict::Virtual);
        let pair = tsc_msr(&e);
        assert_eq!(pair.verdict, Verdict::Native, "{}", pair.why);
        assert!(pair.why.contains("both standing still"), "{}", pair.why);
        // vmcheck has nothing to calibrate by: unsure, not a figure of 0.
        let mut with = ProbeSamples::new();
        with.insert(Probe::CpuidUnfenced, vec![0; 100]);
        assert_eq!(
            vmcheck_rdtsc(&evidence(&with, record(0.0, 0.0, 0.0, 2_000_000))).verdict,
            Verdict::Unsure
        );
    }

    #[test]
    fn noise_within_tolerance_stays_native_and_missing_clocks_leave_the_rules_unsure() {
        let samples = ProbeSamples::new();
        // 0.5% between the spans (the PM timer's reads), kvmclock 3% off (rounding of mul).
        let e = evidence(&samples, record(0.995, 0.999, 1.0, 2_060_000));
        for v in [tsc_msr(&e), tsc_pm_cpuid(&e), tsc_kvmclock_rate(&e)] {
            assert_eq!(v.verdict, Verdict::Native, "{}: {}", v.rule, v.why);
        }
        // Natively: the TSC and the PM timer's equivalent only.
        let native = ClockRecord {
            read: clocks::TSC | clocks::PM_TIMER,
            ..record(1.0, 1.0, 1.0, 0)
        };
        let e = evidence(&samples, native);
        assert_eq!(tsc_msr(&e).verdict, Verdict::Unsure);
        assert_eq!(tsc_kvmclock_rate(&e).verdict, Verdict::Unsure);
        assert_eq!(tsc_pm_cpuid(&e).verdict, Verdict::Native);
        let none = Evidence { clocks: None, ..e };
        assert_eq!(tsc_pm_cpuid(&none).verdict, Verdict::Unsure);
    }

    /// `record`'s clocks with RDTSCP's and MPERF's advance over the run set apart, as
    /// shares of the true 2 s at 2 GHz.
    fn with_tscp_and_mperf(mut r: ClockRecord, rdtscp_share: f64, mperf_share: f64) -> ClockRecord {
        r.span[1].rdtscp = r.span[0].rdtscp + (2.0 * rdtscp_share * GHZ as f64) as u64;
        r.span[1].mperf = r.span[0]
            .mperf
            .wrapping_add((2.0 * mperf_share * GHZ as f64) as i64 as u64);
        r
    }

    #[test]
    fn rdtscp_catches_an_rdtsc_trap_that_leaves_it_alone_and_agrees_where_both_are_one_clock() {
        let samples = ProbeSamples::new();
        // Clear: one counter.
        let clear = tsc_rdtscp(&evidence(&samples, record(1.0, 1.0, 1.0, 2_000_000)));
        assert_eq!(clear.verdict, Verdict::Native, "{}", clear.why);
        // RDTSC-KVM-Handler: RDTSC at 1/20, RDTSCP untrapped.
        let divided = tsc_rdtscp(&evidence(&samples, record(0.05, 1.0, 0.05, 2_000_000)));
        assert_eq!(divided.verdict, Verdict::Virtual, "{}", divided.why);
        assert!(
            divided.why.contains("-95.00%") && divided.why.contains("RDTSCP"),
            "{}",
            divided.why
        );
        // A trap of both from one clock (hide-exits): the pair agrees; other clocks judge it.
        let both = with_tscp_and_mperf(record(0.6, 1.0, 1.0, 2_000_000), 0.6, 1.0);
        assert_eq!(tsc_rdtscp(&evidence(&samples, both)).verdict, Verdict::Native);
        // Noise: half a percent between the two stays native.
        let noisy = with_tscp_and_mperf(record(1.0, 1.0, 1.0, 2_000_000), 1.005, 1.0);
        assert_eq!(tsc_rdtscp(&evidence(&samples, noisy)).verdict, Verdict::Native);
        // An emulating KVM: RDTSCP not read, and the rule says why.
        let unread = ClockRecord {
            read: clocks::TSC | clocks::MSR_TSC | clocks::PM_TIMER,
            ..record(1.0, 1.0, 1.0, 2_000_000)
        };
        let unsure = tsc_rdtscp(&evidence(&samples, unread));
        assert_eq!(unsure.verdict, Verdict::Unsure);
        assert!(unsure.why.contains("stops a guest at rdtscp"), "{}", unsure.why);
    }

    #[test]
    fn mperf_ahead_of_the_tsc_is_caught_and_mperf_behind_it_is_what_sleep_does() {
        let samples = ProbeSamples::new();
        let judge = |r: ClockRecord| tsc_mperf(&evidence(&samples, r));
        let clear = judge(record(1.0, 1.0, 1.0, 2_000_000));
        assert_eq!(clear.verdict, Verdict::Native, "{}", clear.why);
        // The core slept or the vCPU was descheduled for 30% of the run: MPERF behind.
        let slept = judge(with_tscp_and_mperf(record(1.0, 1.0, 1.0, 2_000_000), 1.0, 0.7));
        assert_eq!(slept.verdict, Verdict::Native, "{}", slept.why);
        // BetterTiming's clock under AutoVirt's pass-through: the TSC lost 40%, MPERF none.
        let hidden = judge(record(0.6, 0.6, 1.0, 2_000_000));
        assert_eq!(hidden.verdict, Verdict::Virtual, "{}", hidden.why);
        assert!(hidden.why.contains("+66.67%"), "{}", hidden.why);
        // Noise: MPERF half a percent ahead (the reads at the ends) stays native.
        let noisy = judge(with_tscp_and_mperf(record(1.0, 1.0, 1.0, 2_000_000), 1.0, 1.005));
        assert_eq!(noisy.verdict, Verdict::Native, "{}", noisy.why);
        // MPERF backwards, or counting while the TSC stands: virtual, never a wrapped figure.
        let back = judge(with_tscp_and_mperf(record(1.0, 1.0, 1.0, 2_000_000), 1.0, -0.1));
        assert_eq!(back.verdict, Verdict::Virtual, "{}", back.why);
        assert!(back.why.contains("went back 400000000"), "{}", back.why);
        let standing = judge(record(0.0, 0.0, 0.0, 2_000_000));
        assert_eq!(standing.verdict, Verdict::Virtual, "{}", standing.why);
        // KVM alone: APERF/MPERF not readable, and the rule says why.
        let unread = ClockRecord {
            read: clocks::TSC | clocks::MSR_TSC | clocks::PM_TIMER | clocks::RDTSCP,
            ..record(1.0, 1.0, 1.0, 2_000_000)
        };
        let unsure = judge(unread);
        assert_eq!(unsure.verdict, Verdict::Unsure);
        assert!(unsure.why.contains("#GP"), "{}", unsure.why);
    }

    #[test]
    fn vmchecks_figure_is_the_windows_time_in_hundred_thousandths_of_a_second_over_25000() {
        let mut samples = ProbeSamples::new();
        let e = |samples: &ProbeSamples| vmcheck_rdtsc(&evidence(samples, record(1.0, 1.0, 1.0, 2_000_000)));
        // 100 cycles at 2 GHz = 50 ns; 25,000 of them 1.25 ms: figure 125 <= 200.
        samples.insert(Probe::CpuidUnfenced, vec![100; 1000]);
        let clear = e(&samples);
        assert_eq!(clear.verdict, Verdict::Native, "{}", clear.why);
        assert!((124.0..=125.0).contains(&clear.score), "{}", clear.score);
        // 2,000 cycles (1 us): 2,500 > 200, a VM.
        samples.insert(Probe::CpuidUnfenced, vec![2000; 1000]);
        assert_eq!(e(&samples).verdict, Verdict::Virtual);
        // Hidden to zero (BetterTiming): 0, fooled.
        samples.insert(Probe::CpuidUnfenced, vec![0; 1000]);
        assert_eq!(e(&samples).verdict, Verdict::Native);
        // MSR 0x10: 200 cycles = 250 <= 300; natively it is not there to read.
        samples.insert(Probe::MsrCpuid, vec![200; 1000]);
        let msr = vmcheck_msr(&evidence(&samples, record(1.0, 1.0, 1.0, 2_000_000)));
        assert_eq!(msr.verdict, Verdict::Native, "{}", msr.why);
        assert!((249.0..=250.0).contains(&msr.score), "{}", msr.score);
    }
}
