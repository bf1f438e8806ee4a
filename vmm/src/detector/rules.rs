//! The rules. Each is a plain function of the evidence (and the calibration where it needs
//! one), so each can be fed synthetic samples in tests.

use super::calibration::{Calibration, RunPoint};
use super::verdict::{Evidence, RuleVerdict, Verdict};
use crate::arch::x86_64::cpuid::HYPERVISOR_BIT as CPUID_HYPERVISOR_BIT;
use crate::stats;
use guest_payload::{Cycles, Probe};

/// The names of this module's rules, as verdicts, reports and requirements spell them
/// (each registered once in [`super::RULES`]).
pub const SEED_LINE: &str = "seed-line";
pub const FIXED_THRESHOLD: &str = "fixed-threshold";
pub const TSC_LFENCE_RATIO: &str = "tsc-lfence-ratio";
pub const ROBUST: &str = "robust";
pub const HYPERVISOR_BIT: &str = "hypervisor-bit";
pub const CODE_INTEGRITY: &str = "code-integrity";
pub const TSC_MONOTONIC: &str = "tsc-monotonic";
pub const CHECKHV_NOISE_FLOOR: &str = "checkhv-noise-floor";

/// A rule's answer, its score and confidence rounded as reports show them.
pub(super) fn verdict(rule: &'static str, verdict: Verdict, score: f64, confidence: f64, why: String) -> RuleVerdict {
    RuleVerdict {
        rule,
        verdict,
        score: round3(score),
        confidence: round3(confidence.clamp(0.0, 1.0)),
        why,
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn missing(rule: &'static str, what: &str) -> RuleVerdict {
    verdict(rule, Verdict::Unsure, 0.0, 0.0, format!("no {what} in this run"))
}

/// Confidence from how far `distance` is past a boundary, in units of `scale`.
pub(super) fn confidence_from(distance: f64, scale: f64) -> f64 {
    1.0 - (-distance.abs() / scale.max(1e-9)).exp()
}

fn leaf_note(evidence: &Evidence) -> String {
    if evidence.cpuid_leaf == 0 {
        String::new()
    } else {
        format!(
            " (measured on leaf {:#x}; the rule is defined on leaf 0)",
            evidence.cpuid_leaf
        )
    }
}

/// The seed article: where the run's (NOP, CPUID) medians fall against a dividing line.
/// Score: height above the line in decades of CPUID cost.
pub fn seed_line(evidence: &Evidence, calibration: &Calibration) -> RuleVerdict {
    const RULE: &str = SEED_LINE;
    let (Some(cpuid), Some(nop)) = (evidence.samples.get(&Probe::Cpuid), evidence.samples.get(&Probe::Nop)) else {
        return missing(RULE, "CPUID or NOP samples");
    };
    let (cpuid, nop) = (stats::median(cpuid), stats::median(nop));
    let line = calibration.seed_line;
    let height = line.height_above(nop, cpuid);
    // Within 0.05 decades (~12%) of the line: too close to call.
    let margin = 0.05;
    let v = if height > margin {
        Verdict::Virtual
    } else if height < -margin {
        Verdict::Native
    } else {
        Verdict::Unsure
    };
    let source = if calibration.calibrated {
        "the calibrated line"
    } else {
        "the default line CPUID = 20 × NOP"
    };
    let why = format!(
        "median CPUID {cpuid} cycles at NOP {nop}: {:.2} decades {} {source} ({:.0} cycles there)",
        height.abs(),
        if height >= 0.0 { "above" } else { "below" },
        line.cpuid_at(nop as f64)
    );
    verdict(RULE, v, height, confidence_from(height, 0.2), why)
}

/// fixed-threshold: a VM unless the mean is below this many cycles.
pub const FIXED_THRESHOLD_CYCLES: f64 = 1000.0;
/// tsc-lfence-ratio: a VM from this ratio up.
pub const LFENCE_RATIO_VIRTUAL: f64 = 2.5;
/// robust: virtual from this z up, native below [`ROBUST_NATIVE_Z`], unsure between.
pub const ROBUST_VIRTUAL_Z: f64 = 4.0;
pub const ROBUST_NATIVE_Z: f64 = 2.0;

/// pafish `cpu_rdtsc_force_vmexit` (v0.6) and al-khaser `rdtsc_diff_vmexit` (v1.0.0), as
/// they measure: the first 10 samples of the unfenced probe (`rdtsc; cpuid(0); rdtsc`, no
/// LFENCE, no warm-up), summed as unsigned 64-bit differences (wrapping, as C's unsigned
/// arithmetic does) and divided by 10 in integers; a VM unless 0 < mean < 1000 cycles. A
/// backwards sample wraps to nearly 2^64 and the sum wraps back, so it only shortens the
/// sum — unless the sum itself is negative, when the mean is huge: both said in words.
/// Score: mean / 1000.
pub fn fixed_threshold(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = FIXED_THRESHOLD;
    const TIMINGS: usize = 10;
    const THRESHOLD: u64 = FIXED_THRESHOLD_CYCLES as u64;
    let Some(first) = evidence
        .samples
        .get(&Probe::CpuidUnfenced)
        .and_then(|s| s.get(..TIMINGS))
    else {
        return missing(RULE, "10 unfenced CPUID samples (the cpuid-unfenced probe)");
    };
    // `as u64` of a negative i64 is its two's complement: the originals' unsigned difference.
    let sum = first.iter().fold(0u64, |sum, &c| sum.wrapping_add(c as u64));
    let mean = sum / TIMINGS as u64;
    let native = mean > 0 && mean < THRESHOLD;
    let backwards = first.iter().filter(|&&c| c < 0).count();
    let note = match (backwards, (sum as i64) < 0) {
        (0, _) => String::new(),
        (n, false) => format!(" ({n} ran backwards: unsigned, they wrap and shorten the sum)"),
        (n, true) => format!(" ({n} ran backwards, so far that the unsigned sum wrapped)"),
    };
    let why = format!(
        "integer mean of the first 10 unfenced rdtsc;cpuid;rdtsc timings {mean} cycles: {}{note}{}",
        if native {
            "0 < mean < 1000"
        } else {
            "not 0 < mean < 1000"
        },
        leaf_note(evidence)
    );
    let v = if native { Verdict::Native } else { Verdict::Virtual };
    let ratio = mean as f64 / THRESHOLD as f64;
    verdict(RULE, v, ratio, confidence_from(ratio.max(1e-3).ln(), 0.3), why)
}

/// Trimmed mean: the middle 80%.
fn trimmed_mean(samples: &[Cycles]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let cut = sorted.len() / 10;
    let kept = &sorted[cut..sorted.len() - cut];
    kept.iter().map(|&c| c as f64).sum::<f64>() / kept.len().max(1) as f64
}

/// In the spirit of VMAware's `TIMER` (v2.7.0), not a reproduction of it: the trimmed mean
/// (middle 80%) of CPUID against that of a serialising baseline (8 × LFENCE), both on the
/// guest's TSC; a ratio of 2.5 or more is a VM. VMAware counts on a counter thread, not the
/// TSC, interleaves the two, takes 30–70k pairs, keeps the densest cluster and says VM at
/// 3.5 (docs/detector.md). Score: the ratio.
pub fn tsc_lfence_ratio(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = TSC_LFENCE_RATIO;
    const THRESHOLD: f64 = LFENCE_RATIO_VIRTUAL;
    let (Some(cpuid), Some(lfence)) = (
        evidence.samples.get(&Probe::Cpuid),
        evidence.samples.get(&Probe::Lfence8),
    ) else {
        return missing(RULE, "CPUID or 8×LFENCE samples");
    };
    if cpuid.is_empty() || lfence.is_empty() {
        return missing(RULE, "CPUID or 8×LFENCE samples");
    }
    let ratio = trimmed_mean(cpuid) / trimmed_mean(lfence).max(1.0);
    let v = if ratio >= THRESHOLD {
        Verdict::Virtual
    } else {
        Verdict::Native
    };
    let why = format!(
        "trimmed mean CPUID / 8×LFENCE = {ratio:.2} {} 2.5{}",
        if ratio >= THRESHOLD { ">=" } else { "<" },
        leaf_note(evidence)
    );
    verdict(RULE, v, ratio, confidence_from((ratio / THRESHOLD).ln(), 0.3), why)
}

/// Ours: CPUID's 10th percentile and median over the measurement floor, in ns, against
/// this host's native runs. Score: z of the 10th-percentile excess (the low quantile is
/// what busy hosts and interrupts cannot push down). Virtual from z = 4, native below 2.
/// Confidence shrinks as the run's own spread grows.
pub fn robust(evidence: &Evidence, calibration: &Calibration) -> RuleVerdict {
    const RULE: &str = ROBUST;
    let Some(point) = RunPoint::from_samples(evidence.samples, evidence.tsc_khz) else {
        return missing(RULE, "CPUID samples or a floor (rdtsc/NOP)");
    };
    let native = calibration.robust_excess_p10_ns;
    let scale = robust_scale(native.sd, native.mean);
    let z = (point.excess_p10_ns - native.mean) / scale;
    let z_median = (point.excess_median_ns - calibration.robust_excess_median_ns.mean) / scale;
    let v = if z >= ROBUST_VIRTUAL_Z {
        Verdict::Virtual
    } else if z < ROBUST_NATIVE_Z {
        Verdict::Native
    } else {
        Verdict::Unsure
    };
    // The run's spread: how far the median sits above the low quantile, relative to the
    // excess itself. Noisy runs (busy hosts) get less confidence.
    let spread = ((point.excess_median_ns - point.excess_p10_ns) / point.excess_p10_ns.abs().max(1.0)).max(0.0);
    let distance = if v == Verdict::Virtual {
        z - ROBUST_VIRTUAL_Z
    } else {
        ROBUST_NATIVE_Z - z
    };
    let confidence = confidence_from(distance.max(0.0), 2.0) / (1.0 + spread);
    let source = if calibration.calibrated {
        "this host's native calibration"
    } else {
        "the uncalibrated default"
    };
    let why = format!(
        "CPUID over the floor: p10 {:.0} ns, median {:.0} ns, against {source} {:.0} ± {:.0} ns (z {z:.1}, median z {z_median:.1})",
        point.excess_p10_ns, point.excess_median_ns, native.mean, native.sd
    );
    verdict(RULE, v, z, confidence, why)
}

/// The unit of the robust rule's z: the native runs' spread, but never under 10% of the
/// native excess (nor 5 ns). A calibration takes seconds; on a host that is itself a VM,
/// native CPUID is an exit of the outer hypervisor and its cost moves with the host's load
/// by more than those seconds show.
pub fn robust_scale(native_sd: f64, native_mean: f64) -> f64 {
    native_sd.max(native_mean.abs() * 0.10).max(5.0)
}

/// The CPUID excess over the floor, in ns, from which `robust` says virtual.
pub fn robust_virtual_excess_ns(calibration: &Calibration) -> f64 {
    let native = calibration.robust_excess_p10_ns;
    native.mean + ROBUST_VIRTUAL_Z * robust_scale(native.sd, native.mean)
}

/// Known hypervisor vendor signatures of CPUID leaf 0x40000000 (EBX, ECX, EDX).
const HYPERVISOR_VENDORS: &[&[u8; 12]] = &[
    b"KVMKVMKVM\0\0\0",
    b"Microsoft Hv",
    b"VMwareVMware",
    b"XenVMMXenVMM",
    b"TCGTCGTCGTCG",
    b"VBoxVBoxVBox",
    b" lrpepyh  vr",
    b"bhyve bhyve ",
    b"ACRNACRNACRN",
    b"LinuxPVM\0\0\0\0",
];

/// CPUID.1:ECX[31] and the vendor signature of leaf 0x40000000, as the guest saw them.
/// Score: 1 for each that says "virtual".
pub fn hypervisor_bit(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = HYPERVISOR_BIT;
    let leaf = |n: u32| evidence.cpuid.iter().find(|r| r.leaf == n && r.subleaf == 0);
    let Some(leaf1) = leaf(1) else {
        return missing(RULE, "CPUID snapshot");
    };
    let bit = leaf1.ecx & CPUID_HYPERVISOR_BIT != 0;
    let vendor = leaf(0x4000_0000).map(|r| {
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&r.ebx.to_le_bytes());
        bytes[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        bytes[8..].copy_from_slice(&r.edx.to_le_bytes());
        bytes
    });
    let known_vendor = vendor.filter(|v| HYPERVISOR_VENDORS.contains(&v));
    let printable = |v: &[u8; 12]| {
        v.iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect::<String>()
    };
    let why = format!(
        "CPUID.1:ECX[31] {}; leaf 0x40000000 vendor {}",
        if bit { "set" } else { "clear" },
        match (&known_vendor, &vendor) {
            (Some(v), _) => format!("\"{}\" (a hypervisor)", printable(v)),
            (None, Some(v)) => format!("\"{}\" (not a known hypervisor)", printable(v)),
            (None, None) => "not recorded".to_owned(),
        }
    );
    let score = f64::from(u8::from(bit)) + f64::from(u8::from(known_vendor.is_some()));
    let v = if score > 0.0 { Verdict::Virtual } else { Verdict::Native };
    verdict(RULE, v, score, if score > 0.0 { 1.0 } else { 0.5 }, why)
}

/// The guest reads its own CPUID sites: anything but `0f a2` means the hypervisor patched
/// its code (int3-patch), whatever the timing says. Score: patched sites.
pub fn code_integrity(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = CODE_INTEGRITY;
    if evidence.site_bytes.is_empty() {
        return missing(RULE, "record of the CPUID sites' bytes");
    }
    let opcode = guest_payload::timing::CPUID_OPCODE;
    let patched: Vec<String> = evidence
        .site_bytes
        .iter()
        .enumerate()
        .filter(|(_, bytes)| **bytes != opcode)
        .map(|(i, b)| format!("site {i} reads {:02x} {:02x}", b[0], b[1]))
        .collect();
    if patched.is_empty() {
        let why = format!(
            "all {} CPUID sites read 0f a2: the code is as compiled",
            evidence.site_bytes.len()
        );
        return verdict(RULE, Verdict::Native, 0.0, 0.5, why);
    }
    let why = format!(
        "{}, not 0f a2 (CPUID): the code was patched under the guest",
        patched.join(", ")
    );
    verdict(RULE, Verdict::Virtual, patched.len() as f64, 1.0, why)
}

/// A TSC that runs backwards: any sample, of any probe, whose second timestamp read below
/// its first. A bare-metal TSC is monotonic on one CPU; a hypervisor that moves the
/// guest's TSC back by more than an exit cost (careless hiding) leaves exactly this, and
/// a detector that sees it needs no timing threshold. Score: samples that ran backwards.
pub fn tsc_monotonic(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = TSC_MONOTONIC;
    if evidence.samples.values().all(Vec::is_empty) {
        return missing(RULE, "samples");
    }
    let mut backwards = 0u64;
    let mut worst = 0u64;
    let mut probes = Vec::new();
    // A cross-tsc sample is one vCPU's TSC minus another's, not one clock read twice:
    // cross-vcpu-tsc judges those.
    let one_clock = || evidence.samples.iter().filter(|(probe, _)| **probe != Probe::CrossTsc);
    for (probe, samples) in one_clock() {
        let here: Vec<Cycles> = samples.iter().copied().filter(|&s| s < 0).collect();
        if !here.is_empty() {
            backwards += here.len() as u64;
            worst = worst.max(here.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0));
            probes.push(probe.name());
        }
    }
    if backwards == 0 {
        let total: usize = one_clock().map(|(_, samples)| samples.len()).sum();
        let why = format!("all {total} samples moved forward: the TSC never ran backwards");
        return verdict(RULE, Verdict::Native, 0.0, 0.5, why);
    }
    let why = format!(
        "{backwards} samples ran backwards ({}), by up to {worst} cycles: a monotonic TSC cannot do that (a clock moved under the guest, or the payload's samples are not what they claim)",
        probes.join(", ")
    );
    verdict(RULE, Verdict::Virtual, backwards as f64, 1.0, why)
}

/// checkhv_um `CheckTSCNoiseFloor` (zer0condition/checkhv_um 33cf142, `hv_um.cpp`
/// L269-L309), on the `rdtsc` probe's back-to-back reads: deltas kept when 0 < d < 10,000;
/// "peaks" are deltas above 1.5 × their mean; more than 10% peaks fails the check, as the
/// code does. Its README names a second symptom the code never tests, "unnatural
/// consistency": a virtual clock that steps by one fixed amount gives every delta the
/// same value, which no real TSC read between instructions does over a run, so that is
/// flagged too and said apart. Natively the original reads unfenced pairs 100,000 times;
/// the probe's pairs are fenced (`lfence; rdtsc`), which only narrows the spread.
/// Score: the fraction of peaks over 10%.
pub fn checkhv_noise_floor(evidence: &Evidence) -> RuleVerdict {
    const RULE: &str = CHECKHV_NOISE_FLOOR;
    const KEEP_BELOW: Cycles = 10_000;
    let Some(samples) = evidence.samples.get(&Probe::Rdtsc) else {
        return missing(RULE, "back-to-back RDTSC samples (the rdtsc probe)");
    };
    let kept: Vec<Cycles> = samples.iter().copied().filter(|&d| d > 0 && d < KEEP_BELOW).collect();
    if kept.len() < 2 {
        let why = format!(
            "{} of {} deltas in (0, {KEEP_BELOW}) cycles: too few to judge (the original prints nothing){}",
            kept.len(),
            samples.len(),
            if samples.iter().all(|&d| d == 0) && !samples.is_empty() {
                "; every delta was 0: the TSC stood still between two reads"
            } else {
                ""
            }
        );
        return verdict(RULE, Verdict::Unsure, 0.0, 0.0, why);
    }
    let n = kept.len() as f64;
    let mean = kept.iter().map(|&d| d as f64).sum::<f64>() / n;
    let peaks = kept.iter().filter(|&&d| d as f64 > 1.5 * mean).count();
    let fraction = peaks as f64 / n;
    let (min, max) = (
        kept.iter().min().copied().unwrap_or(0),
        kept.iter().max().copied().unwrap_or(0),
    );
    let stats = format!(
        "{peaks} of {} deltas above 1.5 × mean {mean:.0} cycles ({:.1}%)",
        kept.len(),
        100.0 * fraction
    );
    if fraction > 0.1 {
        let why = format!("{stats}: more than 10% peaks, the check fails (interfered timing)");
        return verdict(
            RULE,
            Verdict::Virtual,
            fraction - 0.1,
            confidence_from(fraction - 0.1, 0.05),
            why,
        );
    }
    if min == max {
        let why = format!(
            "every one of {} deltas was {min} cycles: a clock that steps by a fixed amount (the README's \"unnatural consistency\"; the code itself tests only peaks)",
            kept.len()
        );
        return verdict(RULE, Verdict::Virtual, 0.0, 0.9, why);
    }
    let why = format!("{stats}, deltas {min}..{max}: within the noise floor");
    verdict(
        RULE,
        Verdict::Native,
        fraction - 0.1,
        confidence_from(0.1 - fraction, 0.05),
        why,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::calibration::Spread;
    use crate::detector::{evaluate, Calibration};
    use crate::results::ProbeSamples;
    use crate::stats::SplitMix64;
    use guest_payload::CpuidRecord;
    use std::collections::BTreeMap;

    const TSC_KHZ: u32 = 3_000_000;

    /// Samples around `center` with the given spread and an occasional large outlier.
    fn noisy(center: Cycles, spread: u64, rng: &mut SplitMix64) -> Vec<Cycles> {
        (0..1000)
            .map(|i| {
                let jitter = (rng.next_u64() % (spread + 1)) as Cycles;
                if i % 97 == 0 {
                    center * 20
                } else {
                    center + jitter
                }
            })
            .collect()
    }

    fn samples(cpuid: Cycles, nop: Cycles, floor: Cycles, lfence: Cycles, spread: u64) -> ProbeSamples {
        let mut rng = SplitMix64::new((cpuid ^ nop) as u64);
        BTreeMap::from([
            (Probe::CpuidUnfenced, noisy(cpuid, spread, &mut rng)),
            (Probe::Cpuid, noisy(cpuid, spread, &mut rng)),
            (Probe::Nop, noisy(nop, spread / 10, &mut rng)),
            (Probe::Rdtsc, noisy(floor, spread / 10, &mut rng)),
            (Probe::Lfence8, noisy(lfence, spread / 10, &mut rng)),
        ])
    }

    fn leaves(hypervisor: bool) -> Vec<CpuidRecord> {
        let ecx = if hypervisor { CPUID_HYPERVISOR_BIT } else { 0 };
        let mut records = vec![CpuidRecord {
            leaf: 1,
            ecx,
            ..Default::default()
        }];
        if hypervisor {
            // "KVMKVMKVM\0\0\0"
            records.push(CpuidRecord {
                leaf: 0x4000_0000,
                ebx: 0x4b4d_564b,
                ecx: 0x564b_4d56,
                edx: 0x4d,
                ..Default::default()
            });
        }
        records
    }

    /// A native calibration like a bare-metal 3 GHz host: CPUID ~150 cycles over the floor.
    fn bare_metal_calibration() -> Calibration {
        let mut calibration = Calibration::uncalibrated();
        calibration.calibrated = true;
        calibration.robust_excess_p10_ns = Spread { mean: 50.0, sd: 5.0 };
        calibration.robust_excess_median_ns = Spread { mean: 55.0, sd: 5.0 };
        calibration
    }

    fn run(samples: &ProbeSamples, cpuid: &[CpuidRecord], sites: &[[u8; 2]]) -> BTreeMap<&'static str, Verdict> {
        let evidence = Evidence {
            ticks: &crate::results::ProbeSamples::new(),
            counter_rate: None,
            samples,
            cpuid,
            site_bytes: sites,
            tsc_khz: TSC_KHZ,
            cpuid_leaf: 0,
            payload: None,
            patched_for_an_evader: None,
            clocks: None,
        };
        evaluate(&evidence, &bare_metal_calibration())
            .into_iter()
            .map(|v| (v.rule, v.verdict))
            .collect()
    }

    const INTACT: [[u8; 2]; 2] = [[0x0f, 0xa2], [0x0f, 0xa2]];

    #[test]
    fn clearly_native_samples_are_native_by_every_rule() {
        // CPUID 200 cycles, NOP/floor 40, 8 LFENCEs 120.
        let verdicts = run(&samples(200, 40, 40, 120, 10), &leaves(false), &INTACT);
        for rule in super::super::every_run_rules() {
            assert_eq!(verdicts[rule], Verdict::Native, "{rule}");
        }
    }

    #[test]
    fn clearly_virtual_samples_are_virtual_by_every_timing_rule() {
        // A trapped CPUID: 40,000 cycles against the same NOP and fences.
        let verdicts = run(&samples(40_000, 40, 40, 120, 2_000), &leaves(true), &INTACT);
        for rule in [
            "seed-line",
            "fixed-threshold",
            "tsc-lfence-ratio",
            "robust",
            "hypervisor-bit",
        ] {
            assert_eq!(verdicts[rule], Verdict::Virtual, "{rule}");
        }
        assert_eq!(
            verdicts["code-integrity"],
            Verdict::Native,
            "a hardware trap leaves the code intact"
        );
    }

    #[test]
    fn hidden_exits_fool_timing_but_not_the_signals() {
        // The VMM hid the exit: CPUID looks native, but the patch and CPUID bits remain.
        let patched = [[0xcc, 0x90], [0xcc, 0x90]];
        let verdicts = run(&samples(200, 40, 40, 120, 10), &leaves(true), &patched);
        assert_eq!(verdicts["robust"], Verdict::Native);
        assert_eq!(verdicts["fixed-threshold"], Verdict::Native);
        assert_eq!(verdicts["hypervisor-bit"], Verdict::Virtual);
        assert_eq!(verdicts["code-integrity"], Verdict::Virtual);
    }

    #[test]
    fn noisy_native_samples_fool_the_mean_but_not_the_low_quantile() {
        // Native CPUID with heavy interference: a third of samples inflated 10x.
        let mut noisy_native = samples(200, 40, 40, 120, 30);
        for probe in [Probe::Cpuid, Probe::CpuidUnfenced] {
            if let Some(cpuid) = noisy_native.get_mut(&probe) {
                for (i, s) in cpuid.iter_mut().enumerate() {
                    if i % 3 == 0 {
                        *s *= 10;
                    }
                }
            }
        }
        let verdicts = run(&noisy_native, &leaves(false), &INTACT);
        assert_eq!(
            verdicts["fixed-threshold"],
            Verdict::Virtual,
            "the first ten include inflated samples"
        );
        assert_eq!(verdicts["robust"], Verdict::Native, "p10 ignores the interference");
    }

    /// A run of these samples and nothing else (no CPUID answers, sites, counter or clocks).
    fn samples_only(samples: &ProbeSamples) -> Evidence<'_> {
        Evidence {
            ticks: &EMPTY,
            counter_rate: None,
            samples,
            cpuid: &[],
            site_bytes: &[],
            tsc_khz: TSC_KHZ,
            cpuid_leaf: 0,
            payload: None,
            patched_for_an_evader: None,
            clocks: None,
        }
    }

    static EMPTY: ProbeSamples = ProbeSamples::new();

    fn fixed(unfenced: Option<Vec<Cycles>>, fenced: Vec<Cycles>) -> RuleVerdict {
        let mut samples = BTreeMap::from([(Probe::Cpuid, fenced)]);
        if let Some(unfenced) = unfenced {
            samples.insert(Probe::CpuidUnfenced, unfenced);
        }
        fixed_threshold(&samples_only(&samples))
    }

    #[test]
    fn fixed_threshold_measures_as_pafish_does() {
        // Integer mean of the first ten unfenced timings: 9,999 / 10 = 999 is native...
        let mut just_under = vec![1000; 10];
        just_under[0] = 999;
        let verdict = fixed(Some(just_under.clone()), vec![50_000; 10]);
        assert_eq!(verdict.verdict, Verdict::Native, "{}", verdict.why);
        assert!(verdict.why.contains("999 cycles"), "{}", verdict.why);
        // ...the fenced probe is not what it reads, and samples past the tenth do not count.
        just_under.extend([1_000_000; 90]);
        assert_eq!(fixed(Some(just_under), vec![]).verdict, Verdict::Native);
        assert_eq!(fixed(Some(vec![1000; 10]), vec![]).verdict, Verdict::Virtual);
        // A mean of zero is a VM to pafish (0 < mean is required).
        assert_eq!(fixed(Some(vec![0; 10]), vec![]).verdict, Verdict::Virtual);
        // A backwards timing wraps in the originals' unsigned arithmetic, and so does the
        // sum: nine of 100 and one of -5 add up to 895, a mean of 89, native...
        let mut backwards = vec![100; 10];
        backwards[3] = -5;
        let verdict = fixed(Some(backwards.clone()), vec![]);
        assert_eq!(verdict.verdict, Verdict::Native, "{}", verdict.why);
        assert!(
            verdict.why.contains("89 cycles") && verdict.why.contains("1 ran backwards"),
            "{}",
            verdict.why
        );
        // ...unless the sum is negative: then it stays near 2^64, a VM.
        backwards[3] = -5_000;
        let verdict = fixed(Some(backwards), vec![]);
        assert_eq!(verdict.verdict, Verdict::Virtual);
        assert!(verdict.why.contains("the unsigned sum wrapped"), "{}", verdict.why);
        // Without the unfenced probe (or with fewer than ten) it says so, whatever else ran.
        assert_eq!(fixed(None, vec![100; 1000]).verdict, Verdict::Unsure);
        assert_eq!(fixed(Some(vec![100; 9]), vec![]).verdict, Verdict::Unsure);
    }

    #[test]
    fn a_run_between_the_clusters_is_unsure_to_the_robust_rule() {
        // CPUID excess ~ 3 native sds above the native mean: neither clearly side.
        let floor = 40;
        let cycles_for_ns = |ns: f64| (ns * f64::from(TSC_KHZ) / 1e6) as Cycles;
        let between = samples(floor + cycles_for_ns(50.0 + 3.0 * 5.0), floor, floor, 120, 0);
        let verdicts = run(&between, &leaves(false), &INTACT);
        assert_eq!(verdicts["robust"], Verdict::Unsure);
    }

    #[test]
    fn runs_without_the_evidence_are_unsure_not_wrong() {
        let only_nop = BTreeMap::from([(Probe::Nop, vec![40; 100])]);
        let verdicts = run(&only_nop, &[], &[]);
        for rule in super::super::every_run_rules() {
            // Any samples at all are evidence of whether the TSC ran backwards.
            let expected = if rule == "tsc-monotonic" {
                Verdict::Native
            } else {
                Verdict::Unsure
            };
            assert_eq!(verdicts[rule], expected, "{rule}");
        }
        let nothing = run(&ProbeSamples::new(), &[], &[]);
        assert_eq!(nothing["tsc-monotonic"], Verdict::Unsure);
    }

    #[test]
    fn a_tsc_that_ran_backwards_is_a_vm_whatever_the_timing_says() {
        // Hidden exits that look native to every timing rule, but one sample stepped back.
        let mut hidden = samples(200, 40, 40, 120, 10);
        if let Some(cpuid) = hidden.get_mut(&Probe::Cpuid) {
            cpuid[500] = -12_974;
        }
        let evidence = Evidence {
            ticks: &crate::results::ProbeSamples::new(),
            counter_rate: None,
            samples: &hidden,
            cpuid: &[],
            site_bytes: &[],
            tsc_khz: TSC_KHZ,
            cpuid_leaf: 0,
            payload: None,
            patched_for_an_evader: None,
            clocks: None,
        };
        let verdict = tsc_monotonic(&evidence);
        assert_eq!(verdict.verdict, Verdict::Virtual);
        assert_eq!(verdict.score, 1.0);
        assert!(
            verdict.why.contains("12974") && verdict.why.contains("cpuid"),
            "{}",
            verdict.why
        );
        assert_eq!(run(&hidden, &leaves(false), &INTACT)["robust"], Verdict::Native);
    }

    fn noise_floor_of(rdtsc: Vec<Cycles>) -> RuleVerdict {
        let samples = BTreeMap::from([(Probe::Rdtsc, rdtsc)]);
        checkhv_noise_floor(&samples_only(&samples))
    }

    #[test]
    fn the_noise_floor_passes_a_jittery_tsc_and_fails_peaks_a_fixed_step_and_says_which() {
        let mut rng = SplitMix64::new(7);
        // Clear: 40 cycles with a few cycles of jitter and 1% interrupts.
        let clear = noise_floor_of(noisy(40, 4, &mut rng));
        assert_eq!(clear.verdict, Verdict::Native, "{}", clear.why);
        // Noisy but below the bar: 9% of reads hit by an exit-sized delay.
        let nine: Vec<Cycles> = (0..1000).map(|i| if i % 11 == 0 { 400 } else { 40 + i % 3 }).collect();
        assert_eq!(noise_floor_of(nine).verdict, Verdict::Native);
        // Evaded badly: one read in five pays an exit; the code's own failure.
        let peaks: Vec<Cycles> = (0..1000).map(|i| if i % 5 == 0 { 2_000 } else { 40 + i % 3 }).collect();
        let failed = noise_floor_of(peaks);
        assert_eq!(failed.verdict, Verdict::Virtual, "{}", failed.why);
        assert!(failed.why.contains("200 of 1000"), "{}", failed.why);
        // Evaded well: a virtual clock that adds exactly 25 per read.
        let fixed = noise_floor_of(vec![25; 1000]);
        assert_eq!(fixed.verdict, Verdict::Virtual, "{}", fixed.why);
        assert!(fixed.why.contains("every one of 1000 deltas was 25"), "{}", fixed.why);
        // Deltas of 10,000 and more are dropped, as the original drops them.
        let dropped: Vec<Cycles> = (0..1000)
            .map(|i| if i % 5 == 0 { 20_000 } else { 40 + i % 3 })
            .collect();
        assert_eq!(noise_floor_of(dropped).verdict, Verdict::Native);
        // A TSC that stands still gives nothing to judge; the reason is said.
        let still = noise_floor_of(vec![0; 1000]);
        assert_eq!(still.verdict, Verdict::Unsure);
        assert!(still.why.contains("stood still"), "{}", still.why);
    }
}
