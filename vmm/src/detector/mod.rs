//! The detector: rules that look at one run and say virtual, native or unsure, with a score
//! and one line of why. Timing rules side by side with the non-timing signals, each
//! registered once in [`RULES`] (its name, what it reads, when it applies and whom it
//! follows): `evaluate`, the reports' columns, the validation's confusion matrices and its
//! requirements all read that one list.
//!
//! A payload that reports its own verdict (SDK payloads, `VMM_CAP_VERDICT`) is judged
//! beside them as the rule `payload`.

pub mod calibration;
pub mod clocks;
pub mod crossclock;
pub mod decision;
pub mod rules;
pub mod verdict;

pub use calibration::Calibration;
use guest_payload::Probe;
pub use verdict::{Evidence, RuleVerdict, Verdict};

/// The name under which a payload's own verdict is reported and scored.
pub const PAYLOAD_RULE: &str = "payload";

/// When a rule is judged: a rule that reads something only some runs have is left out of
/// the others' reports (a column of "unsure" would say nothing), the others always judge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applies {
    /// On every run; unsure where the run lacks what it reads.
    EveryRun,
    /// On runs with a counter vCPU's ticks (`--vcpus 2`; natively, a counter thread).
    WithCounter,
    /// On runs with samples of this probe.
    WithProbe(Probe),
    /// On runs that read clocks besides the TSC (the timing core's quiet span and span).
    WithClocks,
    /// On runs whose payload reported its own verdict.
    WithPayloadVerdict,
    /// On runs whose code, if patched, was patched by the hypervisor modelled: not where
    /// the testbed patched it to stage an evader that patches nothing (the report names
    /// the rule as not applicable, and why).
    UnlessPatchedForAnEvader,
}

impl Applies {
    pub fn to(self, evidence: &Evidence) -> bool {
        match self {
            Applies::EveryRun => true,
            Applies::WithCounter => !evidence.ticks.is_empty(),
            Applies::WithProbe(probe) => evidence.samples.contains_key(&probe),
            Applies::WithClocks => evidence.clocks.is_some(),
            Applies::WithPayloadVerdict => evidence.payload.is_some(),
            Applies::UnlessPatchedForAnEvader => evidence.patched_for_an_evader.is_none(),
        }
    }
}

/// One detector rule, described once.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// How verdicts, reports and requirements (`RULE:tpr>=X`) name it.
    pub name: &'static str,
    /// Its heading in a narrow table column.
    pub heading: &'static str,
    pub applies: Applies,
    /// The probes whose samples it judges (none for the signals that are not timings):
    /// without them it is unsure.
    pub probes: &'static [Probe],
    /// What it looks at, in a line.
    pub reads: &'static str,
    /// The detector it reproduces and the version it follows (`vmm`: ours); docs/detector.md
    /// says what each keeps and what differs.
    pub origin: &'static str,
    pub judge: fn(&Evidence, &Calibration) -> RuleVerdict,
}

/// Every rule, in report order: those judged on every run, then those that look past one
/// TSC, then the payload's own verdict.
pub static RULES: [Rule; 23] = [
    Rule {
        name: rules::SEED_LINE,
        heading: rules::SEED_LINE,
        applies: Applies::EveryRun,
        probes: &[Probe::Cpuid, Probe::Nop],
        reads: "(NOP, CPUID) medians against a dividing line",
        origin: "the seed article",
        judge: rules::seed_line,
    },
    Rule {
        name: rules::FIXED_THRESHOLD,
        heading: "fixed",
        applies: Applies::EveryRun,
        probes: &[Probe::CpuidUnfenced],
        reads: "integer mean of the first 10 unfenced `rdtsc; cpuid(0); rdtsc`, VM unless 0 < mean < 1000",
        origin: "pafish v0.6, al-khaser v1.0.0 (faithful)",
        judge: |evidence, _| rules::fixed_threshold(evidence),
    },
    Rule {
        name: rules::TSC_LFENCE_RATIO,
        heading: "lfence",
        applies: Applies::EveryRun,
        probes: &[Probe::Cpuid, Probe::Lfence8],
        reads: "trimmed mean CPUID(0) over 8×LFENCE on the TSC, VM at 2.5",
        origin: "in the spirit of VMAware `TIMER`",
        judge: |evidence, _| rules::tsc_lfence_ratio(evidence),
    },
    Rule {
        name: rules::ROBUST,
        heading: rules::ROBUST,
        applies: Applies::EveryRun,
        probes: &[Probe::Cpuid, Probe::Rdtsc, Probe::Nop],
        reads: "low quantile and median of CPUID over the floor (rdtsc or NOP), in ns, vs native calibration",
        origin: "vmm",
        judge: rules::robust,
    },
    Rule {
        name: rules::HYPERVISOR_BIT,
        heading: "hv-bit",
        applies: Applies::EveryRun,
        probes: &[],
        reads: "CPUID.1:ECX[31] and the 0x40000000 vendor leaf",
        origin: "CPUID itself",
        judge: |evidence, _| rules::hypervisor_bit(evidence),
    },
    Rule {
        name: rules::CODE_INTEGRITY,
        heading: "integrity",
        applies: Applies::UnlessPatchedForAnEvader,
        probes: &[],
        reads: "the bytes of the guest's own CPUID sites",
        origin: "the patching traps' trace",
        judge: |evidence, _| rules::code_integrity(evidence),
    },
    Rule {
        name: rules::TSC_MONOTONIC,
        heading: "monotonic",
        applies: Applies::EveryRun,
        probes: &[],
        reads: "any sample of any probe whose TSC ran backwards",
        origin: "what a hider leaves behind",
        judge: |evidence, _| rules::tsc_monotonic(evidence),
    },
    Rule {
        name: rules::CHECKHV_NOISE_FLOOR,
        heading: "noise-floor",
        applies: Applies::EveryRun,
        probes: &[Probe::Rdtsc],
        reads: "back-to-back RDTSC deltas: over 10% above 1.5 × their mean, or all one value",
        origin: "checkhv_um `CheckTSCNoiseFloor` (33cf142)",
        judge: |evidence, _| rules::checkhv_noise_floor(evidence),
    },
    Rule {
        name: clocks::VMAWARE_TIMER_2_7,
        heading: clocks::VMAWARE_TIMER_2_7,
        applies: Applies::WithCounter,
        probes: &[Probe::TimerCpuid, Probe::TimerLfence8],
        reads: "densest-cluster CPUID(0) / 8×LFENCE in counter ticks, VM at 3.5",
        origin: "VMAware `TIMER` v2.7.0 (619d1583, faithful)",
        judge: |evidence, _| clocks::vmaware_timer_2_7(evidence),
    },
    Rule {
        name: clocks::VMAWARE_TIMER_MAIN,
        heading: clocks::VMAWARE_TIMER_MAIN,
        applies: Applies::WithCounter,
        probes: &[Probe::TimerCpuid, Probe::TimerLfence8],
        reads: "interquartile mean CPUID(0) / 8×LFENCE in counter ticks, VM at 2.5, or a latency over 1000 / of 1 tick",
        origin: "VMAware `TIMER` main e6335799",
        judge: |evidence, _| clocks::vmaware_timer_main(evidence),
    },
    Rule {
        name: clocks::VMAWARE_TIMER_2_8,
        heading: clocks::VMAWARE_TIMER_2_8,
        applies: Applies::WithCounter,
        probes: &[Probe::TimerCpuid, Probe::TimerLfence8],
        reads: "least interquartile mean of five trials, CPUID(0) / 8×LFENCE in counter ticks, VM at 2.5 (15 on a Hyper-V root), at 12,000 ticks, or with no valid pair",
        origin: "VMAware `TIMER` v2.8.1 (1c1ae60) and main 754187b",
        judge: |evidence, _| clocks::vmaware_timer_2_8(evidence),
    },
    Rule {
        name: clocks::COUNTER_TSC,
        heading: clocks::COUNTER_TSC,
        applies: Applies::WithCounter,
        probes: &[Probe::Cpuid],
        reads: "counter time against TSC time over CPUID: the TSC lost time",
        origin: "vmm",
        judge: |evidence, _| clocks::counter_tsc(evidence),
    },
    Rule {
        name: clocks::COUNTER_STALL,
        heading: clocks::COUNTER_STALL,
        applies: Applies::WithCounter,
        probes: &[Probe::Cpuid],
        reads: "the counter stood still over CPUID",
        origin: "vmm, after VMAware main's stall check (e6335799)",
        judge: |evidence, _| clocks::counter_stall(evidence),
    },
    Rule {
        name: clocks::CROSS_VCPU_TSC,
        heading: clocks::CROSS_VCPU_TSC,
        applies: Applies::WithCounter,
        probes: &[Probe::CrossTsc],
        reads: "this vCPU's TSC behind the other's stamp",
        origin: "multi-core TSC checks",
        judge: |evidence, _| clocks::cross_vcpu_tsc(evidence),
    },
    Rule {
        name: clocks::XOR_RATE,
        heading: clocks::XOR_RATE,
        applies: Applies::WithProbe(Probe::XorLoop),
        probes: &[Probe::XorLoop],
        reads: "TSC cycles per dependent-XOR iteration, VM at ≤ 2 or ≥ 8",
        origin: "VMAware e3f097fa (removed before v2.7.0)",
        judge: |evidence, _| clocks::xor_rate(evidence),
    },
    Rule {
        name: crossclock::TSC_MSR,
        heading: crossclock::TSC_MSR,
        applies: Applies::WithClocks,
        probes: &[],
        reads: "RDTSC's advance over the run against MSR 0x10's (one counter), VM beyond 1%",
        origin: "vmm",
        judge: |evidence, _| crossclock::tsc_msr(evidence),
    },
    Rule {
        name: crossclock::TSC_RDTSCP,
        heading: crossclock::TSC_RDTSCP,
        applies: Applies::WithClocks,
        probes: &[],
        reads: "RDTSC's advance over the run against RDTSCP's (one counter), VM beyond 1%; where the KVM runs rdtscp",
        origin: "vmm",
        judge: |evidence, _| crossclock::tsc_rdtscp(evidence),
    },
    Rule {
        name: crossclock::TSC_MPERF,
        heading: crossclock::TSC_MPERF,
        applies: Applies::WithClocks,
        probes: &[],
        reads: "MPERF's advance over the run against RDTSC's, VM where MPERF runs ahead by over 1%; where APERF/MPERF are readable",
        origin: "vmm, after vmcheck's AperfTiming (APERF/MPERF as a clock)",
        judge: |evidence, _| crossclock::tsc_mperf(evidence),
    },
    Rule {
        name: crossclock::TSC_PM_CPUID,
        heading: crossclock::TSC_PM_CPUID,
        applies: Applies::WithClocks,
        probes: &[],
        reads: "the TSC's rate against the PM timer around the CPUID windows vs with none, VM beyond 10%",
        origin: "vmm, after checkhv_um's TSC-vs-OS-timer checks",
        judge: |evidence, _| crossclock::tsc_pm_cpuid(evidence),
    },
    Rule {
        name: crossclock::TSC_KVMCLOCK_RATE,
        heading: "tsc-kvmclock",
        applies: Applies::WithClocks,
        probes: &[],
        reads: "the TSC's rate against the PM timer vs the rate kvmclock states, VM beyond 5%",
        origin: "vmm, after Linux's pvclock_tsc_khz",
        judge: |evidence, _| crossclock::tsc_kvmclock_rate(evidence),
    },
    Rule {
        name: crossclock::VMCHECK_RDTSC,
        heading: crossclock::VMCHECK_RDTSC,
        applies: Applies::WithClocks,
        probes: &[Probe::CpuidUnfenced],
        reads: "100,000 × 25,000 unfenced `rdtsc; cpuid(0); rdtsc` / TSC cycles per second (by the PM timer), VM above 200",
        origin: "vmcheck b1751e9 RdtscTiming (main.c L21-L71)",
        judge: |evidence, _| crossclock::vmcheck_rdtsc(evidence),
    },
    Rule {
        name: crossclock::VMCHECK_MSR,
        heading: crossclock::VMCHECK_MSR,
        applies: Applies::WithProbe(Probe::MsrCpuid),
        probes: &[Probe::MsrCpuid],
        reads: "the same with MSR 0x10 (`rdmsr; cpuid(0); rdmsr`), VM above 300",
        origin: "vmcheck b1751e9 TimestampTiming (main.c L74-L128)",
        judge: |evidence, _| crossclock::vmcheck_msr(evidence),
    },
    Rule {
        name: PAYLOAD_RULE,
        heading: PAYLOAD_RULE,
        applies: Applies::WithPayloadVerdict,
        probes: &[],
        reads: "the verdict the payload reports itself",
        origin: "the payload (`VMM_CAP_VERDICT`)",
        judge: |evidence, _| payload_verdict(evidence.payload),
    },
];

/// The registered rule called `name`.
pub fn rule(name: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.name == name)
}

impl Applies {
    /// Judged on every run but those whose own make-up rules it out: a column of its own
    /// in every report (empty where not applicable), not one that comes and goes.
    fn every_run(self) -> bool {
        matches!(self, Applies::EveryRun | Applies::UnlessPatchedForAnEvader)
    }
}

/// The names of the rules judged on every run, in report order.
pub fn every_run_rules() -> impl Iterator<Item = &'static str> {
    RULES.iter().filter(|r| r.applies.every_run()).map(|r| r.name)
}

/// The rules of a set of runs, in report order: those judged on every run, then the others
/// where any run was judged by them.
pub fn rule_columns<'a>(verdicts: impl IntoIterator<Item = &'a str>) -> Vec<&'static str> {
    let seen: std::collections::BTreeSet<&str> = verdicts.into_iter().collect();
    RULES
        .iter()
        .filter(|r| r.applies.every_run() || seen.contains(r.name))
        .map(|r| r.name)
        .collect()
}

/// Applies every rule that applies to one run, in report order.
pub fn evaluate(evidence: &Evidence, calibration: &Calibration) -> Vec<RuleVerdict> {
    RULES
        .iter()
        .filter(|r| r.applies.to(evidence))
        .map(|r| (r.judge)(evidence, calibration))
        .collect()
}

/// The rules a run's own make-up rules out, each with why: a report names them rather
/// than scoring the testbed's mechanism against what it stages. (Rules that lack what
/// they read, a counter or a probe, are simply absent.)
pub fn not_applicable(evidence: &Evidence) -> Vec<NotApplicable> {
    RULES
        .iter()
        .filter(|r| r.applies == Applies::UnlessPatchedForAnEvader && !r.applies.to(evidence))
        .map(|r| NotApplicable {
            rule: r.name,
            why: evidence.patched_for_an_evader.unwrap_or_default(),
        })
        .collect()
}

/// A rule a run left out on purpose.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NotApplicable {
    pub rule: &'static str,
    pub why: &'static str,
}

/// The payload's verdict as a rule's: its own score, full confidence in its own word.
fn payload_verdict(report: Option<&crate::results::PayloadVerdictReport>) -> RuleVerdict {
    use guest_payload::PayloadVerdict;
    let Some(report) = report else {
        return rules::verdict(
            PAYLOAD_RULE,
            Verdict::Unsure,
            0.0,
            0.0,
            "the payload reported no verdict".into(),
        );
    };
    let verdict = match report.verdict {
        PayloadVerdict::Virtual => Verdict::Virtual,
        PayloadVerdict::Native => Verdict::Native,
        PayloadVerdict::Unsure | PayloadVerdict::None => Verdict::Unsure,
    };
    RuleVerdict {
        rule: PAYLOAD_RULE,
        verdict,
        score: if report.score.is_finite() { report.score } else { 0.0 },
        confidence: 1.0,
        why: format!("the payload says: {}", report.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{PayloadVerdictReport, ProbeSamples};

    /// A run with every probe, counter ticks and a payload verdict: every rule applies.
    fn everything() -> (ProbeSamples, ProbeSamples, PayloadVerdictReport) {
        let mut samples = ProbeSamples::new();
        let mut ticks = ProbeSamples::new();
        for probe in Probe::ALL {
            samples.insert(probe, vec![300; 100]);
            ticks.insert(probe, vec![30; 100]);
        }
        let payload = PayloadVerdictReport {
            verdict: guest_payload::PayloadVerdict::Native,
            score: 0.0,
            reason: "test".into(),
        };
        (samples, ticks, payload)
    }

    fn evidence<'a>(
        samples: &'a ProbeSamples,
        ticks: &'a ProbeSamples,
        payload: Option<&'a PayloadVerdictReport>,
    ) -> Evidence<'a> {
        Evidence {
            samples,
            ticks,
            counter_rate: Some((10_000, 1_000)),
            cpuid: &[],
            site_bytes: &[],
            tsc_khz: 2_000_000,
            cpuid_leaf: 0,
            payload,
            patched_for_an_evader: None,
            clocks: Some(crate::results::ClockRecord::default()),
        }
    }

    #[test]
    fn code_integrity_is_named_not_applicable_where_the_testbed_patched_for_an_evader() {
        let (samples, ticks, payload) = everything();
        let sites = [[0xe6, 0xf7]];
        let patched = Evidence {
            site_bytes: &sites,
            ..evidence(&samples, &ticks, Some(&payload))
        };
        let judged = |e: &Evidence| {
            evaluate(e, &Calibration::uncalibrated())
                .iter()
                .any(|v| v.rule == rules::CODE_INTEGRITY)
        };
        assert!(judged(&patched) && not_applicable(&patched).is_empty());
        let staged = Evidence {
            patched_for_an_evader: Some("why"),
            ..patched
        };
        assert!(!judged(&staged));
        assert_eq!(
            not_applicable(&staged),
            [NotApplicable {
                rule: rules::CODE_INTEGRITY,
                why: "why"
            }]
        );
    }

    #[test]
    fn names_are_unique_and_each_rule_names_its_verdicts_by_its_registered_name() {
        let names: std::collections::BTreeSet<&str> = RULES.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), RULES.len());
        let (samples, ticks, payload) = everything();
        let evidence = evidence(&samples, &ticks, Some(&payload));
        let calibration = Calibration::uncalibrated();
        for rule in &RULES {
            assert_eq!((rule.judge)(&evidence, &calibration).rule, rule.name);
        }
        let judged: Vec<&str> = evaluate(&evidence, &calibration).iter().map(|v| v.rule).collect();
        let registered: Vec<&str> = RULES.iter().map(|r| r.name).collect();
        assert_eq!(
            judged, registered,
            "a run with everything is judged by every rule, in order"
        );
        assert_eq!(rule_columns(judged.iter().copied()), registered);
    }

    #[test]
    fn rules_apply_where_the_run_has_what_they_read() {
        let (samples, _, payload) = everything();
        let no_ticks = ProbeSamples::new();
        let judged: Vec<&str> = evaluate(&evidence(&samples, &no_ticks, None), &Calibration::uncalibrated())
            .iter()
            .map(|v| v.rule)
            .collect();
        assert!(judged.contains(&clocks::XOR_RATE));
        assert!(!judged.contains(&clocks::COUNTER_TSC) && !judged.contains(&PAYLOAD_RULE));
        assert!(judged.contains(&crossclock::TSC_MSR) && judged.contains(&crossclock::VMCHECK_MSR));
        let mut plain = samples.clone();
        plain.remove(&Probe::XorLoop);
        plain.remove(&Probe::MsrCpuid);
        let judged: Vec<&str> = evaluate(
            &Evidence {
                clocks: None,
                ..evidence(&plain, &no_ticks, Some(&payload))
            },
            &Calibration::uncalibrated(),
        )
        .iter()
        .map(|v| v.rule)
        .collect();
        let mut expected: Vec<&str> = every_run_rules().collect();
        expected.push(PAYLOAD_RULE);
        assert_eq!(judged, expected);
        assert_eq!(rule_columns([]), every_run_rules().collect::<Vec<_>>());
    }

    /// The probes a rule declares are ones it cannot judge without.
    #[test]
    fn a_rule_without_its_probes_is_unsure() {
        let (samples, ticks, _) = everything();
        for rule in RULES.iter().filter(|r| !r.probes.is_empty()) {
            let (mut samples, mut ticks) = (samples.clone(), ticks.clone());
            for probe in rule.probes {
                samples.remove(probe);
                ticks.remove(probe);
            }
            let verdict = (rule.judge)(&evidence(&samples, &ticks, None), &Calibration::uncalibrated());
            assert_eq!(verdict.verdict, Verdict::Unsure, "{}: {}", rule.name, verdict.why);
        }
    }
}
