//! An evader as a file a user writes without Rust (`--evade FILE` or a zoo member's name,
//! `configs/evaders/NAME.json`): which TSC reads it traps (every one, or armed for the
//! read after a CPUID), the clock it answers them from, what it does to the counter vCPU
//! and the TSC rate. docs/evaders.md documents the format, each zoo member as its worked
//! example. The clocks are the `ExitPolicy`s of this directory, each faithful to the
//! project it is named after in its own file; a file only chooses and parameterises them.

use super::bettertiming::BetterTiming;
use super::hide_exits::HideExits;
use super::offset_clock::{OffsetClock, Via};
use super::ophion::CpuidCost;
use super::policy::ExitPolicy;
use super::rdtsc_kvm_handler::RdtscKvmHandler;
use super::rdtsc_shield::RdtscShield;
use crate::arch::x86_64::cpuid::CpuidAnswers;
use serde::Deserialize;
use std::path::Path;

/// The zoo: every `configs/evaders/*.json`, embedded at build time (`build.rs`), by name.
const ZOO: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/evader_zoo.rs"));

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EvaderError {
    #[error("cannot read the evader file {path}: {why}")]
    Read { path: String, why: String },
    #[error("the evader file {path}: {why}")]
    Format { path: String, why: String },
    #[error("the evader {name}: {field}: {why}")]
    Field {
        name: String,
        field: &'static str,
        why: String,
    },
}

/// How a TSC read is trapped.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Trap {
    /// Not trapped: the guest reads the real TSC, and no exit is taken.
    #[default]
    None,
    /// Every read exits to the VMM (RDTSC exiting left on).
    Every,
    /// Only the read after a CPUID exit, and only if no other exit came between (Ophion).
    Armed,
}

/// An MSR whose reads an evader intercepts.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum TrappedMsr {
    /// IA32_TSC (0x10).
    Tsc,
    /// IA32_APERF (0xE8): actual cycles, here counted at the TSC's rate from the vCPU's start.
    Aperf,
    /// IA32_MPERF (0xE7): reference cycles, at the TSC's rate from the vCPU's start.
    Mperf,
    /// IA32_TSC_AUX (0xC0000103): what RDTSCP puts in ECX; 0, as KVM leaves it.
    TscAux,
}

impl TrappedMsr {
    pub const ALL: [TrappedMsr; 4] = [
        TrappedMsr::Tsc,
        TrappedMsr::Aperf,
        TrappedMsr::Mperf,
        TrappedMsr::TscAux,
    ];

    pub fn index(self) -> u32 {
        match self {
            TrappedMsr::Tsc => guest_payload::clocks::MSR_IA32_TSC,
            TrappedMsr::Aperf => guest_payload::clocks::MSR_IA32_APERF,
            TrappedMsr::Mperf => guest_payload::clocks::MSR_IA32_MPERF,
            TrappedMsr::TscAux => 0xc000_0103,
        }
    }

    /// As reports name the clock it reads.
    pub fn name(self) -> &'static str {
        match self {
            TrappedMsr::Tsc => "msr-tsc",
            TrappedMsr::Aperf => "aperf",
            TrappedMsr::Mperf => "mperf",
            TrappedMsr::TscAux => "tsc-aux",
        }
    }

    pub fn at(index: u32) -> Option<TrappedMsr> {
        Self::ALL.into_iter().find(|msr| msr.index() == index)
    }
}

/// What a trapped MSR read is answered with.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MsrAnswer {
    /// From the evader's clock (APERF/MPERF: its progress since the vCPU's start).
    Clock,
    /// Passed through: the truth (what a hypervisor that lets the guest read the counter
    /// itself shows), counted here from the guest's real TSC.
    Host,
}

/// Which of the guest's TSC reads reach the VMM.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Traps {
    #[serde(default)]
    pub rdtsc: Trap,
    #[serde(default)]
    pub rdtscp: Trap,
    /// MSRs whose reads exit to the VMM, and how each is answered; the others are KVM's.
    #[serde(default)]
    pub msr: std::collections::BTreeMap<TrappedMsr, MsrAnswer>,
}

impl Traps {
    /// Whether any RDTSC or RDTSCP is trapped (every one, or armed).
    pub fn any_instruction(&self) -> bool {
        self.rdtsc != Trap::None || self.rdtscp != Trap::None
    }

    pub fn msr_tsc(&self) -> bool {
        self.msr.contains_key(&TrappedMsr::Tsc)
    }

    /// The indices of the MSRs trapped, for KVM's filter.
    pub fn msr_indices(&self) -> Vec<u32> {
        self.msr.keys().map(|msr| msr.index()).collect()
    }

    /// Whether a read is patched only while armed.
    pub fn armed(&self) -> bool {
        self.rdtsc == Trap::Armed || self.rdtscp == Trap::Armed
    }
}

/// A cost in cycles, or measured as the original measures it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Cycles {
    Given(u64),
    Measured(MeasuredWord),
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MeasuredWord {
    Measured,
}

impl Cycles {
    fn given(self) -> Option<u64> {
        match self {
            Cycles::Given(cycles) => Some(cycles),
            Cycles::Measured(_) => None,
        }
    }
}

fn default_reset_us() -> u64 {
    super::rdtsc_shield::RESET_US
}
fn default_constant() -> u64 {
    1_000
}
fn default_resync() -> u64 {
    10_000
}
fn measured() -> Cycles {
    Cycles::Measured(MeasuredWord::Measured)
}

/// The clock trapped reads are answered from: the registry of clocks (each kind's name is
/// its spelling here and nowhere else).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Clock {
    /// The real TSC as the exit reached the VMM: hides nothing (`shaping/rdtsc_trap.rs`).
    Truth,
    /// Stops for exactly each CPUID and TSC-read exit (`shaping/hide_exits.rs`).
    StopsForExits,
    /// The host TSC at the last guest entry less every tagged round trip, the guest's own
    /// run before the exit included (`shaping/bettertiming.rs`); RDTSCP reads the same,
    /// or (`rdtscp: closes-by-tenths`) a clock that closes a tenth of its distance to it.
    HidesRoundTrips {
        #[serde(default)]
        rdtscp: RdtscpClock,
    },
    /// Advances by the real TSC's progress since the last read / `divider`, never past the
    /// truth (`shaping/rdtsc_kvm_handler.rs`).
    Slowed { divider: u64 },
    /// At CPL 0, the truth; in user mode, the host TSC / `divider` plus the offset
    /// (`shaping/phantom.rs`).
    ScaledAtUser { divider: u64 },
    /// The truth at the first read, then the last answer plus `step` at every later one
    /// (`shaping/fixed_step.rs`).
    FixedStep { step: u64 },
    /// `start + (real - start) / divider`, `start` reset to the truth `reset_us` after the
    /// last CPUID(0) (`shaping/rdtsc_shield.rs`).
    SlowedNearCpuid0 {
        divider: u64,
        #[serde(default = "default_reset_us")]
        reset_us: u64,
    },
    /// The armed read after a CPUID answers the guest's TSC at that CPUID's exit plus
    /// `cycles`, the cost of a bare-metal CPUID (`shaping/ophion.rs`).
    CpuidCost {
        #[serde(default = "measured")]
        cycles: Cycles,
    },
    /// A CPUID(0) lowers the clock by its exit's duration plus `constant`; every other
    /// entry gives back up to `constant / 2` (`shaping/offset_clock.rs`).
    OffsetBleed {
        #[serde(default = "default_constant")]
        constant: u64,
        via: Via,
    },
    /// Each tagged exit (CPUID) lowers the clock by the exit `overhead`; `resync_ticks`
    /// after, or at any untagged exit, it is put back to the truth
    /// (`shaping/offset_clock.rs`).
    OffsetResync {
        #[serde(default = "measured")]
        overhead: Cycles,
        #[serde(default = "default_resync")]
        resync_ticks: u64,
        via: Via,
    },
}

impl Clock {
    /// The clock's parameter `NAME:N` sets, where the file names one.
    fn set(&mut self, parameter: &str, value: u64) -> bool {
        match (self, parameter) {
            (
                Clock::Slowed { divider } | Clock::ScaledAtUser { divider } | Clock::SlowedNearCpuid0 { divider, .. },
                "divider",
            ) => *divider = value,
            (Clock::SlowedNearCpuid0 { reset_us, .. }, "reset_us") => *reset_us = value,
            (Clock::FixedStep { step }, "step") => *step = value,
            (Clock::CpuidCost { cycles }, "cycles") => *cycles = Cycles::Given(value),
            (Clock::OffsetBleed { constant, .. }, "constant") => *constant = value,
            (Clock::OffsetResync { overhead, .. }, "overhead") => *overhead = Cycles::Given(value),
            (Clock::OffsetResync { resync_ticks, .. }, "resync_ticks") => *resync_ticks = value,
            _ => return false,
        }
        true
    }

    /// Whether it moves the vCPU's TSC offset rather than answering trapped reads.
    pub fn moves_offset(&self) -> bool {
        matches!(
            self,
            Clock::OffsetBleed { via: Via::Offset, .. } | Clock::OffsetResync { via: Via::Offset, .. }
        )
    }

    /// Whether it acts on CPUID exits this VMM must see.
    pub fn needs_cpuid_exits(&self) -> bool {
        matches!(
            self,
            Clock::CpuidCost { .. } | Clock::OffsetBleed { .. } | Clock::OffsetResync { .. }
        )
    }

    /// What is wrong with it, as (field, why).
    fn check(&self, traps: &Traps) -> Result<(), (&'static str, String)> {
        let between = |field, value: u64, low: u64, high: u64| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                Err((field, format!("{value} is not between {low} and {high}")))
            }
        };
        match *self {
            Clock::Slowed { divider } | Clock::ScaledAtUser { divider } => {
                between("clock.divider", divider, 1, 1_000_000)?
            }
            Clock::FixedStep { step } => between("clock.step", step, 0, 100_000_000)?,
            Clock::SlowedNearCpuid0 { divider, reset_us } => {
                between("clock.divider", divider, 1, 1_000_000)?;
                between("clock.reset_us", reset_us, 1, 10_000_000)?;
            }
            Clock::CpuidCost { cycles } => {
                if let Some(cycles) = cycles.given() {
                    between("clock.cycles", cycles, 1, 100_000_000)?;
                }
            }
            Clock::OffsetBleed { constant, .. } => between("clock.constant", constant, 0, 100_000_000)?,
            Clock::OffsetResync {
                overhead, resync_ticks, ..
            } => {
                if let Some(overhead) = overhead.given() {
                    between("clock.overhead", overhead, 0, 100_000_000)?;
                }
                between("clock.resync_ticks", resync_ticks, 1, u64::from(u32::MAX))?;
            }
            Clock::HidesRoundTrips {
                rdtscp: RdtscpClock::ClosesByTenths,
            } if traps.rdtscp == Trap::None => {
                return Err((
                    "clock.rdtscp",
                    "closes-by-tenths answers RDTSCP, and RDTSCP is not trapped: trap rdtscp".into(),
                ))
            }
            Clock::Truth | Clock::StopsForExits | Clock::HidesRoundTrips { .. } => {}
        }
        let armed = matches!(self, Clock::CpuidCost { .. });
        if traps.armed() != armed {
            return Err((
                "traps",
                if armed {
                    "the clock cpuid-cost answers only the read after a CPUID: trap RDTSC \"armed\"".into()
                } else {
                    "\"armed\" traps only the read after a CPUID, which only the clock cpuid-cost answers".into()
                },
            ));
        }
        if self.moves_offset() {
            if traps.any_instruction() || !traps.msr.is_empty() {
                return Err((
                    "traps",
                    "a clock \"via\": \"offset\" moves the TSC offset and traps nothing: leave traps out".into(),
                ));
            }
        } else if !traps.any_instruction() && !traps.msr_tsc() {
            return Err((
                "traps",
                "the clock answers trapped reads, and none is trapped: trap rdtsc, rdtscp or the msr tsc".into(),
            ));
        }
        Ok(())
    }
}

/// What a trapped RDTSCP reads, beside the clock's RDTSC.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RdtscpClock {
    /// What RDTSC reads.
    #[default]
    Same,
    /// Hypervisor-Phantom NIKA's: a tenth of the way to the clock at each read, all of it
    /// where the gap since the last read is longer than the one before
    /// (`shaping/bettertiming.rs`).
    ClosesByTenths,
}

/// What the evader does to the counter vCPU of `--vcpus 2`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CounterAct {
    /// Nothing: it runs on, a clock the evader does not reach.
    #[default]
    Runs,
    /// `pause-counter`.
    Paused,
    /// `shared-offset`.
    SharedOffset,
}

/// An evader file as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EvaderFile {
    /// What it does, in a line.
    pub description: String,
    /// The project it reproduces: repository, commit, file, lines.
    #[serde(default)]
    pub models: Option<String>,
    /// What of the original this testbed cannot do.
    #[serde(default)]
    pub not_reproduced: Option<String>,
    #[serde(default)]
    pub traps: Traps,
    /// Absent where it traps nothing (a counter or rate evader).
    #[serde(default)]
    pub clock: Option<Clock>,
    #[serde(default)]
    pub counter: CounterAct,
    /// The whole VM's TSC rate (`tsc-khz:N`; checked as that block's argument is).
    #[serde(default)]
    pub tsc_khz: Option<u64>,
    /// The clock parameter `NAME:N` sets (`divider`, `constant`...), where it takes one;
    /// without `:N` the file's own value holds.
    #[serde(default)]
    pub argument: Option<String>,
    /// What the guest's CPUID answers, on every VM path (KVM's table, and the VMM's
    /// answers read from it).
    #[serde(default)]
    pub cpuid: CpuidAnswers,
}

/// One evader, loaded, checked and with its argument applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evader {
    /// As reports name it: the zoo name or file stem, and `:N` where given.
    pub name: String,
    pub file: EvaderFile,
}

/// Every zoo member's name, in order.
pub fn zoo_names() -> impl Iterator<Item = &'static str> {
    ZOO.iter().map(|(name, _)| *name)
}

/// The zoo member `name`'s file text.
pub fn zoo_text(name: &str) -> Option<&'static str> {
    ZOO.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// Every zoo member's file, parsed as written (its argument not applied): what help
/// texts and `vmm doctor` describe. A member that does not parse is left out here and
/// refused by name when asked for (`every_zoo_member_parses...` keeps there being none).
pub fn zoo() -> impl Iterator<Item = (&'static str, EvaderFile)> {
    ZOO.iter()
        .filter_map(|(name, text)| Some((*name, serde_json::from_str::<EvaderFile>(text).ok()?)))
}

/// Whether `value` names an evader file rather than a zoo member or a building block.
pub fn is_path(value: &str) -> bool {
    value.ends_with(".json") || value.contains('/')
}

impl Evader {
    /// `NAME[:N]` of the zoo, or a path to a `.json` file (`:N` after it too); `None`
    /// where `value` is neither.
    pub fn find(value: &str) -> Option<Result<Evader, EvaderError>> {
        let (stem, argument) = match value.rsplit_once(':') {
            Some((stem, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (stem, Some(n)),
            _ => (value, None),
        };
        let (label, text) = if is_path(stem) {
            let path = Path::new(stem);
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    return Some(Err(EvaderError::Read {
                        path: stem.to_owned(),
                        why: e.to_string(),
                    }))
                }
            };
            let label = path
                .file_stem()
                .map_or_else(|| stem.to_owned(), |s| s.to_string_lossy().into_owned());
            (label, text)
        } else {
            (stem.to_owned(), zoo_text(stem)?.to_owned())
        };
        Some(Self::parse(&label, stem, &text, argument))
    }

    /// Parses and checks one file's text (`source`: where it came from, for errors).
    pub fn parse(label: &str, source: &str, text: &str, argument: Option<&str>) -> Result<Evader, EvaderError> {
        let mut file: EvaderFile = serde_json::from_str(text).map_err(|e| EvaderError::Format {
            path: source.to_owned(),
            why: e.to_string(),
        })?;
        let field = |field: &'static str, why: String| EvaderError::Field {
            name: label.to_owned(),
            field,
            why,
        };
        let mut name = label.to_owned();
        match (argument, file.argument.as_deref()) {
            (Some(text), None) => return Err(field("argument", format!("it takes no argument, and was given {text}"))),
            (Some(text), Some(parameter)) => {
                let value = text
                    .parse::<u64>()
                    .map_err(|_| field("argument", format!("{text} is too large a number")))?;
                let set = file.clock.as_mut().is_some_and(|clock| clock.set(parameter, value));
                if !set {
                    return Err(field(
                        "argument",
                        format!("the clock has no parameter {parameter:?} for {label}:N to set"),
                    ));
                }
                name = format!("{label}:{value}");
            }
            (None, _) => {}
        }
        match &file.clock {
            Some(clock) => clock.check(&file.traps).map_err(|(f, why)| field(f, why))?,
            None if file.traps.any_instruction() || file.traps.msr.values().any(|a| *a == MsrAnswer::Clock) => {
                return Err(field(
                    "clock",
                    "reads are trapped and no clock answers them: give a clock".into(),
                ))
            }
            None => {}
        }
        if file.clock.is_none()
            && file.counter == CounterAct::Runs
            && file.tsc_khz.is_none()
            && file.traps.msr.is_empty()
            && file.cpuid == CpuidAnswers::default()
        {
            return Err(field(
                "clock",
                "the evader does nothing: give a clock, a counter act, a tsc_khz, MSRs to pass through or CPUID answers"
                    .into(),
            ));
        }
        Ok(Evader { name, file })
    }

    pub fn traps(&self) -> &Traps {
        &self.file.traps
    }

    pub fn clock(&self) -> Option<&Clock> {
        self.file.clock.as_ref()
    }

    /// What the guest's CPUID says where the evader changes it.
    pub fn cpuid(&self) -> CpuidAnswers {
        self.file.cpuid
    }

    /// The clock's policy, where it has one.
    pub fn clock_policy(&self) -> Option<Box<dyn ExitPolicy>> {
        Some(match self.file.clock.clone()? {
            Clock::Truth => Box::new(super::rdtsc_trap::RdtscTrap),
            Clock::StopsForExits => Box::new(HideExits::default()),
            Clock::HidesRoundTrips { rdtscp } => Box::new(BetterTiming::new(rdtscp == RdtscpClock::ClosesByTenths)),
            Clock::Slowed { divider } => Box::new(RdtscKvmHandler::new(divider)),
            Clock::FixedStep { step } => Box::new(super::fixed_step::FixedStep::new(step)),
            Clock::ScaledAtUser { divider } => Box::new(super::phantom::ScaledAtUser::new(divider)),
            Clock::SlowedNearCpuid0 { divider, reset_us } => Box::new(RdtscShield::new(divider, reset_us)),
            Clock::CpuidCost { cycles } => Box::new(CpuidCost::new(cycles.given())),
            Clock::OffsetBleed { constant, via } => Box::new(OffsetClock::bleed(constant, via)),
            Clock::OffsetResync {
                overhead,
                resync_ticks,
                via,
            } => Box::new(OffsetClock::resync(overhead.given(), resync_ticks, via)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::Visibility;

    fn parse(text: &str) -> Result<Evader, EvaderError> {
        Evader::parse("mine", "mine.json", text, None)
    }

    #[test]
    fn every_zoo_member_parses_and_names_what_it_models() {
        let names: Vec<_> = zoo_names().collect();
        for expected in [
            "rdtsc-trap",
            "hide-exits",
            "bettertiming",
            "rdtsc-kvm-handler",
            "rdtsc-shield",
            "ophion",
            "kvm-rdtsc-hack",
            "jonomango-hv",
            "hypervisor-phantom-vmx",
            "hypervisor-phantom-nika",
            "autovirt-aperfmperf",
        ] {
            assert!(names.contains(&expected), "{expected} in {names:?}");
        }
        for name in names {
            let text = zoo_text(name).unwrap();
            let file: EvaderFile = serde_json::from_str(text).unwrap();
            let argument = file.argument.as_ref().map(|_| "7");
            let evader = Evader::parse(name, name, text, argument).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!evader.file.description.is_empty(), "{name}");
            if evader.clock().is_some() && name != "rdtsc-trap" && name != "hide-exits" {
                assert!(evader.file.models.is_some(), "{name} cites its original");
            }
        }
    }

    #[test]
    fn a_malformed_or_impossible_file_names_the_field() {
        let unknown = parse(r#"{"description":"x","clok":{"kind":"truth"}}"#).unwrap_err();
        assert!(unknown.to_string().contains("unknown field `clok`"), "{unknown}");
        let kind = parse(r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"warp"}}"#).unwrap_err();
        assert!(kind.to_string().contains("unknown variant `warp`"), "{kind}");
        let zero = parse(r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"slowed","divider":0}}"#)
            .unwrap_err();
        assert!(
            matches!(
                &zero,
                EvaderError::Field {
                    field: "clock.divider",
                    ..
                }
            ),
            "{zero}"
        );
        let untrapped = parse(r#"{"description":"x","clock":{"kind":"stops-for-exits"}}"#).unwrap_err();
        assert!(matches!(untrapped, EvaderError::Field { field: "traps", .. }));
        let armed = parse(r#"{"description":"x","traps":{"rdtsc":"armed"},"clock":{"kind":"truth"}}"#).unwrap_err();
        assert!(matches!(armed, EvaderError::Field { field: "traps", .. }));
        let offset =
            parse(r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"offset-bleed","via":"offset"}}"#)
                .unwrap_err();
        assert!(matches!(offset, EvaderError::Field { field: "traps", .. }));
        let nothing = parse(r#"{"description":"x"}"#).unwrap_err();
        assert!(matches!(nothing, EvaderError::Field { field: "clock", .. }));
        let msr =
            parse(r#"{"description":"x","traps":{"rdtsc":"every","msr":{"pmc0":"host"}},"clock":{"kind":"truth"}}"#)
                .unwrap_err();
        assert!(msr.to_string().contains("unknown variant `pmc0`"), "{msr}");
        let answer =
            parse(r#"{"description":"x","traps":{"rdtsc":"every","msr":{"aperf":"guess"}},"clock":{"kind":"truth"}}"#)
                .unwrap_err();
        assert!(answer.to_string().contains("unknown variant `guess`"), "{answer}");
        let msrs = parse(
            r#"{"description":"x","traps":{"rdtsc":"every","msr":{"tsc":"clock","mperf":"host","tsc-aux":"host"}},"clock":{"kind":"truth"}}"#,
        )
        .unwrap();
        assert_eq!(
            msrs.traps().msr_indices(),
            vec![0x10, 0xe7, 0xc000_0103],
            "MPERF is 0xE7"
        );
    }

    #[test]
    fn an_evader_may_only_hide_cpuid_answers_and_says_so_in_its_cpuid_field() {
        let hides = parse(r#"{"description":"x","cpuid":{"hypervisor":"hidden"}}"#).unwrap();
        assert_eq!(hides.cpuid().hypervisor, Visibility::Hidden);
        assert_eq!(hides.cpuid().rdtscp, Visibility::Shown);
        let shown = parse(r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"truth"}}"#).unwrap();
        assert_eq!(shown.cpuid(), CpuidAnswers::KVM, "the default");
        let rdtscp = parse(r#"{"description":"x","cpuid":{"rdtscp":"hidden"}}"#).unwrap();
        assert_eq!(rdtscp.cpuid().rdtscp, Visibility::Hidden);
        let bad = parse(r#"{"description":"x","cpuid":{"hypervisor":"gone"}}"#).unwrap_err();
        assert!(bad.to_string().contains("unknown variant `gone`"), "{bad}");
        let typo = parse(r#"{"description":"x","cpuid":{"hypervisr":"hidden"}}"#).unwrap_err();
        assert!(typo.to_string().contains("unknown field `hypervisr`"), "{typo}");
        let nothing = parse(r#"{"description":"x","cpuid":{"hypervisor":"shown"}}"#).unwrap_err();
        assert!(nothing.to_string().contains("does nothing"), "{nothing}");
    }

    #[test]
    fn an_argument_sets_the_parameter_the_file_names_and_nothing_else() {
        let text = r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"slowed","divider":20},"argument":"divider"}"#;
        let sixteen = Evader::parse("h", "h", text, Some("16")).unwrap();
        assert_eq!(sixteen.name, "h:16");
        assert_eq!(sixteen.clock(), Some(&Clock::Slowed { divider: 16 }));
        let default = Evader::parse("h", "h", text, None).unwrap();
        assert_eq!(
            (default.name.as_str(), default.clock()),
            ("h", Some(&Clock::Slowed { divider: 20 }))
        );
        let zero = Evader::parse("h", "h", text, Some("0")).unwrap_err();
        assert!(matches!(
            zero,
            EvaderError::Field {
                field: "clock.divider",
                ..
            }
        ));
        let none = r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"truth"}}"#;
        let given = Evader::parse("t", "t", none, Some("3")).unwrap_err();
        assert!(matches!(given, EvaderError::Field { field: "argument", .. }));
    }

    #[test]
    fn a_file_on_disk_is_found_by_path_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slow.json");
        std::fs::write(
            &path,
            r#"{"description":"x","traps":{"rdtsc":"every"},"clock":{"kind":"slowed","divider":4}}"#,
        )
        .unwrap();
        let found = Evader::find(path.to_str().unwrap()).unwrap().unwrap();
        assert_eq!(found.name, "slow");
        let gone = Evader::find("/nonexistent/evader.json").unwrap().unwrap_err();
        assert!(matches!(gone, EvaderError::Read { .. }), "{gone}");
        assert!(Evader::find("teleport").is_none());
        assert!(Evader::find("bettertiming").unwrap().is_ok());
    }
}
