//! Rules that look past one TSC: the counter vCPU's clock (VMAware's `TIMER` and ours),
//! the TSC across the two vCPUs, and retired work against the TSC. They run where the
//! run has what they read (`--vcpus 2`; the `xor-loop` probe).
//!
//! VMAware is cited from `src/vmaware.hpp` at the tag v2.7.0 (619d1583, `timer()`
//! L5373-5758), at main (e6335799, L5899-6160, helpers L3374-3709), and, for the XOR
//! loop, at e3f097fa (2026-03-09; the check was added in 5d32ca5 and removed in a9368b0,
//! before v2.7.0). docs/detector.md says what each rule keeps and what differs.

use super::rules::{confidence_from, verdict};
use super::verdict::{Evidence, RuleVerdict, Verdict};
use crate::arch::x86_64::cpuid::HYPERVISOR_BIT;
use guest_payload::Probe;

fn unsure(rule: &'static str, why: String) -> RuleVerdict {
    verdict(rule, Verdict::Unsure, 0.0, 0.0, why)
}

/// How far a ratio is from its threshold, as the TSC ratio rules judge it.
fn confidence_of_ratio(ratio: f64, threshold: f64) -> f64 {
    confidence_from((ratio.max(1e-9) / threshold).ln(), 0.3)
}

/// The names of this module's rules, as verdicts, reports and requirements spell them
/// (each registered once in [`super::RULES`]).
pub const VMAWARE_TIMER_2_7: &str = "vmaware-timer-2.7";
pub const VMAWARE_TIMER_MAIN: &str = "vmaware-timer-main";
pub const VMAWARE_TIMER_2_8: &str = "vmaware-timer-2.8";
pub const COUNTER_TSC: &str = "counter-tsc";
pub const COUNTER_STALL: &str = "counter-stall";
pub const CROSS_VCPU_TSC: &str = "cross-vcpu-tsc";
pub const XOR_RATE: &str = "xor-rate";

/// Median as VMAware computes it (v2.7.0 L5503-5510): the middle of the sorted values, the
/// truncating mean of the two middle ones for an even count.
fn median_of_sorted(sorted: &[u64]) -> u64 {
    match sorted.len() {
        0 => 0,
        n if n % 2 == 1 => sorted[n / 2],
        n => ((u128::from(sorted[n / 2 - 1]) + u128::from(sorted[n / 2])) / 2) as u64,
    }
}

/// VMAware v2.7.0's `calculate_latency` (L5490-5638): the densest low cluster of the
/// samples, grown greedily, then its 10%-trimmed mean, clamped near the median.
pub fn densest_cluster_latency(samples: &[u64]) -> u64 {
    let n = samples.len();
    let mut s = samples.to_vec();
    s.sort_unstable();
    match n {
        0 => return 0,
        1 => return s[0],
        2..=4 => return s[0],
        _ => {}
    }
    let m = median_of_sorted(&s);
    let mut deviations: Vec<u64> = s.iter().map(|&x| x.abs_diff(m)).collect();
    deviations.sort_unstable();
    let mad = median_of_sorted(&deviations);
    let sigma = if mad == 0 { 1.0 } else { mad as f64 * 1.4826 };
    let window = n.min(10usize.max((n as f64 * 0.08).ceil() as usize));
    let mut best_i = 0;
    let mut best_span = (s[n - 1] - s[0]).saturating_add(1);
    for i in 0..=(n - window) {
        let span = s[i + window - 1] - s[i];
        if span < best_span {
            best_span = span;
            best_i = i;
        }
    }
    let three_sigma = (3.0 * sigma).ceil() as u64;
    let (mut lo, mut hi) = (best_i, best_i + window);
    while lo > 0 {
        let new_span = s[hi - 1] - s[lo - 1];
        if new_span as f64 <= 1.5 * best_span as f64 || s[hi - 1] <= s[lo - 1].saturating_add(three_sigma) {
            lo -= 1;
            best_span = best_span.min(new_span);
        } else {
            break;
        }
    }
    while hi < n {
        let new_span = s[hi] - s[lo];
        if new_span as f64 <= 1.5 * best_span as f64 || s[hi] <= s[lo].saturating_add(three_sigma) {
            hi += 1;
            best_span = best_span.min(new_span);
        } else {
            break;
        }
    }
    let cluster = hi - lo;
    let min_cluster = n.min(5usize.max(n / 50));
    if cluster < min_cluster || (cluster as f64 / n as f64) < 0.02 {
        let low = 1usize.max(n / 10);
        return median_of_sorted(&s[..low]);
    }
    let trim = cluster / 10;
    let (tlo, thi) = (lo + trim, hi - trim);
    if thi <= tlo {
        return median_of_sorted(&s[lo..hi]);
    }
    let sum: f64 = s[tlo..thi].iter().map(|&x| x as f64).sum();
    let mut result = (sum / (thi - tlo) as f64).round() as u64;
    if result as f64 - m as f64 > 6.0 * sigma {
        result = (m as f64 + 4.0 * sigma).round() as u64;
    }
    if result == 0 {
        s[0]
    } else {
        result
    }
}

/// VMAware main's `calculate_latency` (L3658-3683): the mean of the middle 50% of the
/// sorted samples, rounded half up.
pub fn interquartile_mean(samples: &[u64]) -> u64 {
    let n = samples.len();
    let mut s = samples.to_vec();
    s.sort_unstable();
    match n {
        0 => return 0,
        1 => return s[0],
        _ => {}
    }
    let kept = &s[n / 4..(3 * n) / 4];
    if kept.is_empty() {
        return s[n / 2];
    }
    let sum: f64 = kept.iter().map(|&x| x as f64).sum();
    (sum / kept.len() as f64 + 0.5) as u64
}

/// Hyper-V as VMAware's `util::hyper_x()` sees it from CPUID (main L4158-4277), as far as
/// a guest snapshot can tell: not a root partition (0x40000003.EBX[0] clear), a hypervisor
/// bit, and a vendor leaf whose maximum is 0x4000000B. The root-partition branches need the
/// IDT base and leaf 0x40000100 and never match here.
fn hyper_v_detected(evidence: &Evidence) -> bool {
    let leaf = |l: u32| evidence.cpuid.iter().find(|r| r.leaf == l && r.subleaf == 0);
    let hypervisor_bit = leaf(1).is_some_and(|r| r.ecx & HYPERVISOR_BIT != 0);
    let root = leaf(0x4000_0003).is_some_and(|r| r.ebx & 1 != 0);
    let max_leaf_11 = leaf(0x4000_0000).is_some_and(|r| r.eax & 0xff == 11);
    !root && hypervisor_bit && max_leaf_11
}

/// TIMER's latencies from the ticks, by `latency`: over the pairs where both windows saw
/// the counter move (`v_post > v_pre && r_post > r_pre`; TIMER retakes the others), and a
/// note of how many there were. Unsure where there are none.
fn timer_latencies(
    evidence: &Evidence,
    rule: &'static str,
    latency: fn(&[u64]) -> u64,
) -> Result<(u64, u64, String), RuleVerdict> {
    let (Some(cpuid), Some(lfence)) = (
        evidence.ticks.get(&Probe::TimerCpuid),
        evidence.ticks.get(&Probe::TimerLfence8),
    ) else {
        return Err(unsure(rule, "no timer-cpuid/timer-lfence8 ticks in this run".into()));
    };
    let (v, r): (Vec<u64>, Vec<u64>) = cpuid
        .iter()
        .zip(lfence)
        .filter(|&(&c, &l)| c > 0 && l > 0)
        .map(|(&c, &l)| (c as u64, l as u64))
        .unzip();
    let dropped = cpuid.len().min(lfence.len()) - v.len();
    if v.is_empty() {
        return Err(unsure(
            rule,
            format!("every one of {dropped} pairs had a window the counter did not move in: TIMER would retake them for ever"),
        ));
    }
    Ok((latency(&v), latency(&r), pairs_note(v.len(), dropped)))
}

fn pairs_note(kept: usize, dropped: usize) -> String {
    let mut note = format!("{kept} pairs");
    if dropped > 0 {
        note.push_str(&format!(", {dropped} with a window that saw no tick dropped"));
    }
    if !(30_000..=70_000).contains(&(kept + dropped)) {
        note.push_str("; TIMER takes 30,000-70,000");
    }
    note
}

/// VMAware `TIMER` as of v2.7.0: the densest-cluster latency of CPUID(0) over that of
/// 8 × LFENCE, both in counter ticks, pairs interleaved (the timer-cpuid/timer-lfence8
/// probes); a VM at a ratio of 3.5 (25 with Hyper-V). Score: the ratio.
pub fn vmaware_timer_2_7(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = VMAWARE_TIMER_2_7;
    let (cpuid_l, ref_l, pairs) = match timer_latencies(evidence, RULE, densest_cluster_latency) {
        Ok(found) => found,
        Err(unsure) => return unsure,
    };
    let threshold = if hyper_v_detected(evidence) { 25.0 } else { 3.5 };
    let ratio = if ref_l == 0 { 0.0 } else { cpuid_l as f64 / ref_l as f64 };
    let virtual_ = ratio >= threshold;
    let why = format!(
        "CPUID(0) {cpuid_l} ticks / 8×LFENCE {ref_l} ticks = {ratio:.2} {} {threshold} ({})",
        if virtual_ { ">=" } else { "<" },
        pairs
    );
    let v = if virtual_ { Verdict::Virtual } else { Verdict::Native };
    verdict(RULE, v, ratio, confidence_of_ratio(ratio, threshold), why)
}

/// VMAware `TIMER` as on main (e6335799): the interquartile mean of each, a VM at a ratio
/// of 2.5 (35 with Hyper-V), or where either latency is over 1000 ticks or exactly 1
/// ("artificial interrupt delivery": a counter paused by IPIs, L6139). main times the
/// reference first and keeps the best of three batches; here one batch in v2.7.0's order.
/// Score: the ratio.
pub fn vmaware_timer_main(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = VMAWARE_TIMER_MAIN;
    let (cpuid_l, ref_l, pairs) = match timer_latencies(evidence, RULE, interquartile_mean) {
        Ok(found) => found,
        Err(unsure) => return unsure,
    };
    let threshold = if hyper_v_detected(evidence) { 35.0 } else { 2.5 };
    let ratio = if ref_l == 0 { 0.0 } else { cpuid_l as f64 / ref_l as f64 };
    let by_ratio = ratio >= threshold;
    let artificial = cpuid_l > 1000 || ref_l > 1000 || cpuid_l == 1 || ref_l == 1;
    let why = format!(
        "CPUID(0) {cpuid_l} ticks / reference {ref_l} ticks = {ratio:.2} {} {threshold}{} ({})",
        if by_ratio { ">=" } else { "<" },
        if artificial {
            "; a latency over 1000 ticks or of exactly 1: artificial interrupt delivery"
        } else {
            ""
        },
        pairs
    );
    let v = if by_ratio || artificial {
        Verdict::Virtual
    } else {
        Verdict::Native
    };
    verdict(RULE, v, ratio, confidence_of_ratio(ratio, threshold), why)
}

/// VMAware 2.8's trials (v2.8.1 1c1ae60 L6150-6763, main 754187b L6786-7305): five.
const TIMER_2_8_TRIALS: usize = 5;
/// A latency at or over this many ticks, in either window, is "artificial IPI delivery"
/// (v2.8.1 L6712-6718; unchanged at 754187b).
const TIMER_2_8_IPI: u64 = 12_000;

/// Hyper-V's root partition as VMAware 2.8's `hyper_x() == HYPERV_HOST` reads CPUID
/// (v2.8.1 L4744-4782, 754187b L5337-5384): the hypervisor bit, "Microsoft Hv" and
/// 0x40000003.EBX[0]. Its HAL (and at 754187b TPM boot-log) checks are not guest-visible
/// here and are taken as passed.
fn hyper_v_root(evidence: &Evidence) -> bool {
    let leaf = |l: u32| evidence.cpuid.iter().find(|r| r.leaf == l && r.subleaf == 0);
    let vendor = leaf(0x4000_0000).is_some_and(|r| {
        let bytes: Vec<u8> = [r.ebx, r.ecx, r.edx].iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes == b"Microsoft Hv"
    });
    let hypervisor_bit = leaf(1).is_some_and(|r| r.ecx & HYPERVISOR_BIT != 0);
    let root = leaf(0x4000_0003).is_some_and(|r| r.ebx & 1 != 0);
    hypervisor_bit && vendor && root
}

/// VMAware `TIMER` as of v2.8.1 and main 754187b (identical on the CPUID side): the
/// run's pairs cut into five trials; per trial the mean of the middle 50% of each window,
/// over the pairs where both saw the counter move; the least of each over the trials, on
/// its own. A VM at a ratio of 2.5 (on a Hyper-V root partition 15 at 754187b, 75 at
/// v2.8.1); else where either latency is 12,000 ticks or more (IPI); and where no trial
/// had a single valid pair (no 1:1 vCPU pinning). Score: the ratio.
///
/// What differs: the original draws 500-1000 pairs per trial and retakes invalid ones
/// (up to 5,000); here the run's pairs are cut in five and invalid ones dropped. Its
/// reference is SERIALIZE on an Intel CPU that has it (3× at v2.8.1, 1× at 754187b), else
/// 8×LFENCE, the probe here; 754187b's #DB comparison is a rule of its own.
pub fn vmaware_timer_2_8(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = VMAWARE_TIMER_2_8;
    let (Some(cpuid), Some(lfence)) = (
        evidence.ticks.get(&Probe::TimerCpuid),
        evidence.ticks.get(&Probe::TimerLfence8),
    ) else {
        return unsure(RULE, "no timer-cpuid/timer-lfence8 ticks in this run".into());
    };
    let pairs = cpuid.len().min(lfence.len());
    if pairs < TIMER_2_8_TRIALS {
        return unsure(RULE, format!("{pairs} pairs: fewer than TIMER's five trials"));
    }
    let per_trial = pairs / TIMER_2_8_TRIALS;
    let (mut best_cpuid, mut best_ref, mut valid) = (u64::MAX, u64::MAX, 0usize);
    for trial in 0..TIMER_2_8_TRIALS {
        let range = trial * per_trial..(trial + 1) * per_trial;
        let (v, r): (Vec<u64>, Vec<u64>) = cpuid[range.clone()]
            .iter()
            .zip(&lfence[range])
            .filter(|&(&c, &l)| c > 0 && l > 0)
            .map(|(&c, &l)| (c as u64, l as u64))
            .unzip();
        if v.is_empty() {
            continue;
        }
        valid += v.len();
        best_cpuid = best_cpuid.min(interquartile_mean(&v));
        best_ref = best_ref.min(interquartile_mean(&r));
    }
    let batch_note = if (500..=1000).contains(&per_trial) {
        String::new()
    } else {
        "; TIMER draws 500-1000 per trial".into()
    };
    let pairs_note = format!(
        "{valid} valid of {} pairs in 5 trials of {per_trial}{batch_note}",
        per_trial * TIMER_2_8_TRIALS
    );
    if valid == 0 {
        return verdict(
            RULE,
            Verdict::Virtual,
            0.0,
            0.5,
            format!("no trial had a pair where the counter moved in both windows: \"hypervisor with no 1:1 vCPU pinning\" ({pairs_note})"),
        );
    }
    let root = hyper_v_root(evidence);
    let threshold = if root { 15.0 } else { 2.5 };
    let ratio = if best_ref == 0 {
        0.0
    } else {
        best_cpuid as f64 / best_ref as f64
    };
    let by_ratio = ratio >= threshold;
    let ipi = !by_ratio && (best_cpuid >= TIMER_2_8_IPI || best_ref >= TIMER_2_8_IPI);
    let root_note = if root {
        format!(
            "; a Hyper-V root partition: v2.8.1's threshold of 75 says {}",
            if ratio >= 75.0 || ipi { "VM" } else { "not" }
        )
    } else {
        String::new()
    };
    let why = format!(
        "CPUID(0) {best_cpuid} ticks / 8×LFENCE {best_ref} ticks = {ratio:.2} {} {threshold}{}{root_note} ({pairs_note})",
        if by_ratio { ">=" } else { "<" },
        if ipi {
            "; a latency of 12,000 ticks or more: \"artificial IPI delivery\""
        } else {
            ""
        },
    );
    let v = if by_ratio || ipi {
        Verdict::Virtual
    } else {
        Verdict::Native
    };
    verdict(RULE, v, ratio, confidence_of_ratio(ratio, threshold), why)
}

/// TSC cycles per counter tick over the run's rate window (`--vcpus 2` runs time
/// [`guest_payload::counter::RATE_CYCLES`] of a register-only loop before any probe, with no exit in it).
pub fn cycles_per_tick(rate: Option<(u64, u64)>) -> Option<f64> {
    match rate {
        Some((cycles, ticks)) if cycles > 0 && ticks > 0 => {
            Some(((cycles as f64 / ticks as f64) * 10.0).round() / 10.0)
        }
        _ => None,
    }
}

/// How many ticks the counter moved over the CPUID probe against how many its rate away
/// from exits says it should have for the TSC's cycles (medians): 1 where the clocks
/// agree, far above where the TSC lost time over CPUID (hidden), far below where the
/// counter stood still (paused).
fn counter_agreement(evidence: &Evidence) -> Result<(f64, f64), String> {
    let cycles_per_tick =
        cycles_per_tick(evidence.counter_rate).ok_or("the counter's rate is unknown: the run has no rate window")?;
    let (Some(samples), Some(ticks)) = (evidence.samples.get(&Probe::Cpuid), evidence.ticks.get(&Probe::Cpuid)) else {
        return Err("no CPUID samples with counter ticks".into());
    };
    let (cycles, seen) = (crate::stats::median(samples), crate::stats::median(ticks));
    let expected = cycles as f64 / cycles_per_tick;
    if expected < 1.0 {
        return Err(format!(
            "the TSC's {cycles} cycles over CPUID are worth {expected:.1} ticks: too short to compare"
        ));
    }
    Ok((seen as f64 / expected, cycles_per_tick))
}

/// counter-tsc: from this agreement up the TSC lost time over CPUID. Natively on the
/// development host (itself a VM) the agreement ran 0.86-1.54 over 14 runs: the counter's
/// rate moves with SMT and frequency, the TSC's does not; on nested SVM 0.9-1.12 plain,
/// 1.47-1.51 with --hide (which takes back only ~40% there), 0-0.68 with pause-counter.
pub const CLOCK_DISAGREEMENT: f64 = 2.0;
/// counter-stall: at this agreement or below the counter stood still over CPUID.
pub const COUNTER_STALLED: f64 = 0.7;

/// Ours: the counter's time over the CPUID probe against the TSC's. Where the TSC says
/// CPUID took less than half what the counter says, time was hidden from the TSC: a VM.
/// Score: the agreement ratio (counter time / TSC time).
pub fn counter_tsc(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = COUNTER_TSC;
    let (agreement, rate) = match counter_agreement(evidence) {
        Ok(found) => found,
        Err(why) => return unsure(RULE, why),
    };
    let hidden = agreement >= CLOCK_DISAGREEMENT;
    let why = format!(
        "over CPUID the counter moved {agreement:.2}× the ticks the TSC's cycles are worth (one tick = {rate} cycles in the rate window): {}",
        if hidden {
            "the TSC lost time there (hidden, or a counter faster than in its rate window: docs/detector.md)"
        } else {
            "the clocks agree (a VM from 2×)"
        }
    );
    let v = if hidden { Verdict::Virtual } else { Verdict::Native };
    verdict(
        RULE,
        v,
        agreement,
        confidence_of_ratio(agreement, CLOCK_DISAGREEMENT),
        why,
    )
}

/// Ours: a counter that stands still while the TSC says CPUID took its time: someone
/// stopped the counter's CPU during the exit (an evader's IPI). A VM where the counter
/// moved 0.7× or less of the ticks the TSC's cycles are worth. Score: 1 / agreement.
pub fn counter_stall(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = COUNTER_STALL;
    let (agreement, rate) = match counter_agreement(evidence) {
        Ok(found) => found,
        Err(why) => return unsure(RULE, why),
    };
    let stalled = agreement <= COUNTER_STALLED;
    let why = format!(
        "over CPUID the counter moved {agreement:.2}× the ticks the TSC's cycles are worth (one tick = {rate} cycles in the rate window): {}",
        if stalled {
            "it stood still while CPUID ran (paused, or a counter slower than in its rate window: docs/detector.md)"
        } else {
            "it kept counting"
        }
    );
    let v = if stalled { Verdict::Virtual } else { Verdict::Native };
    let score = 1.0 / agreement.max(1e-6);
    verdict(RULE, v, score, confidence_of_ratio(score, 1.0 / COUNTER_STALLED), why)
}

/// Share of cross-vCPU samples that may be negative before the rule calls it.
pub const CROSS_TSC_NEGATIVE_SHARE: f64 = 0.01;

/// Ours, as multi-core TSC checks do it: this vCPU's TSC, read just after the other vCPU
/// stamped its own, can never be behind it where both TSCs agree. A VM where more than 1%
/// of the samples are (one vCPU's offset moved and not the other's). Score: the share.
pub fn cross_vcpu_tsc(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = CROSS_VCPU_TSC;
    let Some(samples) = evidence.samples.get(&Probe::CrossTsc).filter(|s| !s.is_empty()) else {
        return unsure(RULE, "no cross-tsc samples in this run".into());
    };
    let negative = samples.iter().filter(|&&s| s < 0).count();
    let share = negative as f64 / samples.len() as f64;
    let min = samples.iter().copied().min().unwrap_or(0);
    let behind = share > CROSS_TSC_NEGATIVE_SHARE;
    let why = if negative == 0 {
        format!(
            "all {} reads of this vCPU's TSC came after the other vCPU's stamp (min +{min} cycles)",
            samples.len()
        )
    } else {
        format!(
            "{negative} of {} reads of this vCPU's TSC were behind the other vCPU's stamp (by up to {} cycles): {}",
            samples.len(),
            min.unsigned_abs(),
            if behind {
                "the vCPUs' TSCs disagree"
            } else {
                "within 1%: noise"
            }
        )
    };
    let v = if behind { Verdict::Virtual } else { Verdict::Native };
    verdict(
        RULE,
        v,
        share,
        if behind {
            share.min(1.0).sqrt()
        } else {
            1.0 - share * 50.0
        },
        why,
    )
}

/// VMAware e3f097fa's IPC rule (L5695-5727): TSC cycles per iteration of the dependent XOR
/// chain, a VM at 2 or less (the TSC scaled down or stopped) or at 8 or more. It ran
/// 150,000,000 iterations once on a thread of its own; here each sample is 256 and the
/// median sample is taken. Score: cycles per iteration.
pub fn xor_rate(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = XOR_RATE;
    let Some(samples) = evidence.samples.get(&Probe::XorLoop).filter(|s| !s.is_empty()) else {
        return unsure(RULE, "no xor-loop samples in this run".into());
    };
    let per_iteration = crate::stats::median(samples) as f64 / guest_payload::counter::XOR_ITERATIONS as f64;
    let virtual_ = per_iteration <= 2.0 || per_iteration >= 8.0;
    let why = format!(
        "{per_iteration:.2} TSC cycles per XOR iteration (median of {} samples of {}): {}",
        samples.len(),
        guest_payload::counter::XOR_ITERATIONS,
        if per_iteration <= 2.0 {
            "at most 2: the TSC runs slow against the work (scaled or stopped)"
        } else if per_iteration >= 8.0 {
            "8 or more: the work runs slow against the TSC"
        } else {
            "between 2 and 8"
        }
    );
    let v = if virtual_ { Verdict::Virtual } else { Verdict::Native };
    let distance = if virtual_ {
        1.0
    } else {
        ((per_iteration - 2.0).min(8.0 - per_iteration) / 3.0).min(1.0)
    };
    verdict(RULE, v, per_iteration, distance, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::Calibration;
    use crate::results::ProbeSamples;
    use guest_payload::CpuidRecord;

    /// Every registered rule that applies, as a report gets them.
    fn evaluate(evidence: &Evidence) -> Vec<RuleVerdict> {
        crate::detector::evaluate(evidence, &Calibration::uncalibrated())
    }

    fn evidence<'a>(samples: &'a ProbeSamples, ticks: &'a ProbeSamples, cpuid: &'a [CpuidRecord]) -> Evidence<'a> {
        Evidence {
            samples,
            ticks,
            cpuid,
            site_bytes: &[],
            counter_rate: Some((10_000, 1_000)),
            tsc_khz: 2_000_000,
            cpuid_leaf: 0,
            payload: None,
            patched_for_an_evader: None,
            clocks: None,
        }
    }

    /// A noiseless run: `cpuid` TSC cycles and `cpuid_ticks` per CPUID, the counter at one
    /// tick per 10 cycles elsewhere, 8×LFENCE 4 ticks, `cross` for the cross-vCPU samples.
    fn run(cpuid: i64, cpuid_ticks: i64, timer_cpuid_ticks: i64, cross: i64) -> (ProbeSamples, ProbeSamples) {
        let n = 1000;
        let mut samples = ProbeSamples::new();
        let mut ticks = ProbeSamples::new();
        samples.insert(Probe::Cpuid, vec![cpuid; n]);
        ticks.insert(Probe::Cpuid, vec![cpuid_ticks; n]);
        samples.insert(Probe::Nop, vec![50; n]);
        ticks.insert(Probe::Nop, vec![5; n]);
        samples.insert(Probe::Rdtsc, vec![20; n]);
        ticks.insert(Probe::Rdtsc, vec![2; n]);
        samples.insert(Probe::TimerCpuid, vec![cpuid; n]);
        ticks.insert(Probe::TimerCpuid, vec![timer_cpuid_ticks; n]);
        samples.insert(Probe::TimerLfence8, vec![40; n]);
        ticks.insert(Probe::TimerLfence8, vec![4; n]);
        samples.insert(Probe::CrossTsc, vec![cross; n]);
        ticks.insert(Probe::CrossTsc, vec![1; n]);
        (samples, ticks)
    }

    fn verdicts(samples: &ProbeSamples, ticks: &ProbeSamples) -> Vec<(&'static str, Verdict)> {
        evaluate(&evidence(samples, ticks, &[]))
            .into_iter()
            .map(|v| (v.rule, v.verdict))
            .collect()
    }

    fn of(verdicts: &[(&'static str, Verdict)], rule: &str) -> Verdict {
        verdicts.iter().find(|(r, _)| *r == rule).map(|(_, v)| *v).unwrap()
    }

    #[test]
    fn clear_cases_native_a_plain_vm_and_each_evasion() {
        // Native: CPUID 100 cycles = 10 ticks; TIMER 10/4 = 2.5 < 3.5 (but main's 2.5 says VM:
        // main is the stricter one).
        let (s, t) = run(100, 10, 10, 300);
        let v = verdicts(&s, &t);
        assert_eq!(of(&v, "vmaware-timer-2.7"), Verdict::Native);
        assert_eq!(of(&v, "counter-tsc"), Verdict::Native);
        assert_eq!(of(&v, "counter-stall"), Verdict::Native);
        assert_eq!(of(&v, "cross-vcpu-tsc"), Verdict::Native);
        // A VM, nothing hidden: 2000 cycles, 200 ticks: TIMER sees it, the clocks agree.
        let (s, t) = run(2000, 200, 200, 300);
        let v = verdicts(&s, &t);
        assert_eq!(of(&v, "vmaware-timer-2.7"), Verdict::Virtual);
        assert_eq!(of(&v, "vmaware-timer-main"), Verdict::Virtual);
        assert_eq!(of(&v, "counter-tsc"), Verdict::Native);
        // Hidden TSC (native-looking 100 cycles) on vCPU 0 only: the counter still says
        // 200 ticks, and vCPU 0's TSC is now behind vCPU 1's.
        let (s, t) = run(100, 200, 200, -5000);
        let v = verdicts(&s, &t);
        assert_eq!(of(&v, "vmaware-timer-2.7"), Verdict::Virtual);
        assert_eq!(of(&v, "counter-tsc"), Verdict::Virtual);
        assert_eq!(of(&v, "cross-vcpu-tsc"), Verdict::Virtual);
        // The counter paused for the exit: TIMER is fooled, the stall is not.
        let (s, t) = run(2000, 2, 2, 300);
        let v = verdicts(&s, &t);
        assert_eq!(of(&v, "vmaware-timer-2.7"), Verdict::Native);
        assert_eq!(of(&v, "counter-stall"), Verdict::Virtual);
        assert_eq!(of(&v, "counter-tsc"), Verdict::Native);
    }

    #[test]
    fn mains_stall_rule_fires_on_latencies_of_one_or_over_a_thousand() {
        let (s, t) = run(100, 10, 1, 300);
        let main = vmaware_timer_main(&evidence(&s, &t, &[]));
        assert_eq!(main.verdict, Verdict::Virtual, "{}", main.why);
        assert!(main.why.contains("artificial"), "{}", main.why);
        let (s, t) = run(100, 10, 5000, 300);
        assert_eq!(vmaware_timer_main(&evidence(&s, &t, &[])).verdict, Verdict::Virtual);
    }

    #[test]
    fn noisy_samples_keep_their_verdicts_and_pairs_without_ticks_are_dropped() {
        let (mut s, mut t) = run(100, 10, 10, 300);
        // Every tenth CPUID an interrupt: 50× the time, in both clocks.
        for (i, (c, k)) in s
            .get_mut(&Probe::Cpuid)
            .unwrap()
            .iter_mut()
            .zip(t.get_mut(&Probe::Cpuid).unwrap().iter_mut())
            .enumerate()
        {
            if i % 10 == 0 {
                *c *= 50;
                *k *= 50;
            }
        }
        for (i, k) in t.get_mut(&Probe::TimerCpuid).unwrap().iter_mut().enumerate() {
            if i % 10 == 0 {
                *k = if i % 20 == 0 { 0 } else { 500 };
            }
        }
        // A few reads behind the stamp: under 1%, noise.
        for c in s.get_mut(&Probe::CrossTsc).unwrap().iter_mut().take(5) {
            *c = -20;
        }
        let v = verdicts(&s, &t);
        assert_eq!(of(&v, "vmaware-timer-2.7"), Verdict::Native);
        assert_eq!(of(&v, "counter-tsc"), Verdict::Native);
        assert_eq!(of(&v, "counter-stall"), Verdict::Native);
        assert_eq!(of(&v, "cross-vcpu-tsc"), Verdict::Native);
        let timer = vmaware_timer_2_7(&evidence(&s, &t, &[]));
        assert!(
            timer.why.contains("50 with a window that saw no tick dropped"),
            "{}",
            timer.why
        );
    }

    #[test]
    fn a_counter_that_never_moves_leaves_the_rules_unsure_not_fooled() {
        let (s, mut t) = run(2000, 0, 0, 300);
        for ticks in t.values_mut() {
            ticks.iter_mut().for_each(|x| *x = 0);
        }
        // A counter that never moved has no rate either (the rate window saw no tick).
        let stopped = Evidence {
            counter_rate: Some((10_000, 0)),
            ..evidence(&s, &t, &[])
        };
        let v: Vec<_> = evaluate(&stopped).into_iter().map(|v| (v.rule, v.verdict)).collect();
        for rule in [
            "vmaware-timer-2.7",
            "vmaware-timer-main",
            "counter-tsc",
            "counter-stall",
        ] {
            assert_eq!(of(&v, rule), Verdict::Unsure, "{rule}");
        }
    }

    #[test]
    fn hyper_v_raises_timers_threshold() {
        let (s, t) = run(2000, 50, 50, 300); // ratio 12.5: a VM at 3.5, not at 25
        let hv = [
            CpuidRecord {
                leaf: 1,
                ecx: HYPERVISOR_BIT,
                ..Default::default()
            },
            CpuidRecord {
                leaf: 0x4000_0000,
                eax: 0x4000_000b,
                ..Default::default()
            },
        ];
        assert_eq!(vmaware_timer_2_7(&evidence(&s, &t, &[])).verdict, Verdict::Virtual);
        let timer = vmaware_timer_2_7(&evidence(&s, &t, &hv));
        assert_eq!(timer.verdict, Verdict::Native, "{}", timer.why);
        assert!(timer.why.contains("< 25"));
    }

    #[test]
    fn vmaware_2_8_trials_keep_the_least_of_each_window_and_flag_ipi_and_no_valid_pair() {
        // Clear: CPUID 8 ticks / LFENCE 4 = 2.0 < 2.5.
        let (s, t) = run(2000, 50, 8, 300);
        let clear = vmaware_timer_2_8(&evidence(&s, &t, &[]));
        assert_eq!(clear.verdict, Verdict::Native, "{}", clear.why);
        assert!(clear.why.contains("5 trials of 200"), "{}", clear.why);
        // A VM: 50 / 4.
        let (s, t) = run(2000, 50, 50, 300);
        assert_eq!(vmaware_timer_2_8(&evidence(&s, &t, &[])).verdict, Verdict::Virtual);
        // Noisy: one trial quiet (the least is kept), the others slow: native.
        let (s, mut t) = run(2000, 50, 50, 300);
        t.get_mut(&Probe::TimerCpuid).unwrap()[400..600]
            .iter_mut()
            .for_each(|x| *x = 8);
        let noisy = vmaware_timer_2_8(&evidence(&s, &t, &[]));
        assert_eq!(noisy.verdict, Verdict::Native, "{}", noisy.why);
        // A reference window as slow as 12,000 ticks: the ratio is low, the IPI rule says VM.
        let (s, mut t) = run(2000, 50, 12_000, 300);
        t.insert(Probe::TimerLfence8, vec![12_000; 1000]);
        let ipi = vmaware_timer_2_8(&evidence(&s, &t, &[]));
        assert_eq!(ipi.verdict, Verdict::Virtual, "{}", ipi.why);
        assert!(ipi.why.contains("IPI"), "{}", ipi.why);
        // No pair where both windows saw a tick: VM ("no 1:1 vCPU pinning"), not unsure.
        let (s, mut t) = run(2000, 50, 0, 300);
        t.insert(Probe::TimerLfence8, vec![0; 1000]);
        let none = vmaware_timer_2_8(&evidence(&s, &t, &[]));
        assert_eq!(none.verdict, Verdict::Virtual, "{}", none.why);
        assert!(none.why.contains("pinning"), "{}", none.why);
    }

    #[test]
    fn vmaware_2_8_raises_its_threshold_on_a_hyper_v_root_partition_only() {
        let (s, t) = run(2000, 50, 40, 300); // ratio 10
        let word = |text: &[u8; 12]| -> [u32; 3] {
            let w = |i: usize| u32::from_le_bytes(text[i..i + 4].try_into().unwrap());
            [w(0), w(4), w(8)]
        };
        let [ebx, ecx, edx] = word(b"Microsoft Hv");
        let mut root = vec![
            CpuidRecord {
                leaf: 1,
                ecx: HYPERVISOR_BIT,
                ..Default::default()
            },
            CpuidRecord {
                leaf: 0x4000_0000,
                eax: 0x4000_000b,
                ebx,
                ecx,
                edx,
                ..Default::default()
            },
            CpuidRecord {
                leaf: 0x4000_0003,
                ebx: 1,
                ..Default::default()
            },
        ];
        let host = vmaware_timer_2_8(&evidence(&s, &t, &root));
        assert_eq!(host.verdict, Verdict::Native, "{}", host.why);
        assert!(
            host.why.contains("< 15") && host.why.contains("75 says not"),
            "{}",
            host.why
        );
        root[2].ebx = 0; // a guest partition: the plain threshold
        assert_eq!(vmaware_timer_2_8(&evidence(&s, &t, &root)).verdict, Verdict::Virtual);
    }

    #[test]
    fn the_densest_cluster_ignores_a_high_tail_and_the_iqm_is_the_middle_half() {
        let mut samples: Vec<u64> = vec![10; 900];
        samples.extend(vec![11; 50]);
        samples.extend(vec![5000; 50]);
        assert_eq!(densest_cluster_latency(&samples), 10);
        assert_eq!(densest_cluster_latency(&[7, 3, 9]), 3);
        assert_eq!(densest_cluster_latency(&[]), 0);
        // The middle four of eight: (3 + 4 + 100 + 200) / 4 = 76.75, rounded half up.
        assert_eq!(interquartile_mean(&[1, 2, 3, 4, 100, 200, 300, 400]), 77);
    }

    #[test]
    fn the_xor_rate_flags_a_slow_or_fast_tsc() {
        let mut samples = ProbeSamples::new();
        let ticks = ProbeSamples::new();
        for (cycles, expected) in [
            (256 * 5, Verdict::Native),
            (256, Verdict::Virtual),
            (256 * 20, Verdict::Virtual),
        ] {
            samples.insert(Probe::XorLoop, vec![cycles; 100]);
            assert_eq!(xor_rate(&evidence(&samples, &ticks, &[])).verdict, expected, "{cycles}");
        }
    }
}
