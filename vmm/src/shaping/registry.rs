//! Every evasion a run can stage besides latency shaping (`--evade NAME[:ARG]` or
//! `--evade FILE`, joined with `+` in matrices): the building blocks listed here, and the
//! evaders of the zoo (`configs/evaders/NAME.json`) or a user's file (`evader.rs`), at most
//! one per run. Each is refused clearly where the run or this KVM cannot do it.

use super::evader::{CounterAct, Evader, Traps};
use super::evasion::{EvasionError, EvasionKind, Needs};
use super::policy::ExitPolicy;
use crate::arch::x86_64::cpuid::CpuidAnswers;

/// The building blocks, in the order reports name them.
pub const EVASIONS: [&EvasionKind; 3] = [
    &super::pause_counter::KIND,
    &super::shared_offset::KIND,
    &super::tsc_khz::KIND,
];

fn known_spellings() -> String {
    let blocks = EVASIONS.iter().map(|kind| match kind.argument {
        Some(_) => format!("{}:N", kind.name),
        None => kind.name.to_owned(),
    });
    // A zoo member's argument is optional (the file's own value holds without it).
    let zoo = super::evader::zoo().map(|(name, file)| match file.argument {
        Some(_) => format!("{name}[:N]"),
        None => name.to_owned(),
    });
    let mut all: Vec<String> = blocks.chain(zoo).collect();
    all.push("or an evader file (PATH.json)".into());
    all.join(", ")
}

/// `--evade`'s help, from the registry and the zoo: each spelling and what it does.
pub fn help() -> String {
    let blocks = EVASIONS.iter().map(|kind| match kind.argument {
        Some(argument) => format!("{}:N ({}; N: {argument})", kind.name, kind.does),
        None => format!("{} ({})", kind.name, kind.does),
    });
    let zoo = super::evader::zoo().map(|(name, file)| match file.argument {
        Some(parameter) => format!(
            "{name}[:N] ({}; N: the clock's {parameter}, the file's own without it)",
            file.description
        ),
        None => format!("{name} ({})", file.description),
    });
    format!(
        "Evasions beyond the TSC offset, comma-separated: the building blocks and the evader zoo \
         (configs/evaders/), or your own evader file (docs/evaders.md): {}",
        blocks.chain(zoo).collect::<Vec<_>>().join("; ")
    )
}

/// One building block chosen for a run, with its argument.
#[derive(Clone, Copy, Debug)]
pub struct Evasion {
    pub kind: &'static EvasionKind,
    pub argument: Option<u64>,
}

impl PartialEq for Evasion {
    fn eq(&self, other: &Self) -> bool {
        self.kind.name == other.kind.name && self.argument == other.argument
    }
}

impl Eq for Evasion {}

impl Evasion {
    /// `NAME` or `NAME:ARG`, as it was spelt.
    pub fn name(&self) -> String {
        match self.argument {
            Some(value) => format!("{}:{value}", self.kind.name),
            None => self.kind.name.to_owned(),
        }
    }
}

/// The evasions of one run: building blocks, each at most once, in registry order (those
/// an evader's file asks for among them), and at most one evader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evasions {
    blocks: Vec<Evasion>,
    /// The blocks given by name, for the report's name.
    named: Vec<String>,
    evader: Option<Evader>,
}

fn block(value: &str) -> Option<Result<Evasion, EvasionError>> {
    let (name, argument) = match value.split_once(':') {
        Some((name, argument)) => (name, Some(argument)),
        None => (value, None),
    };
    let kind = EVASIONS.iter().copied().find(|k| k.name == name)?;
    let unknown = || EvasionError::Unknown {
        given: value.to_owned(),
        expected: known_spellings(),
    };
    Some(match (kind.argument, argument) {
        (None, None) => Ok(Evasion { kind, argument: None }),
        (Some(_), Some(text)) => match text.parse::<u64>() {
            Err(_) => Err(unknown()),
            Ok(value) => match (kind.check)(value) {
                Err(why) => Err(EvasionError::Argument {
                    name: kind.name,
                    value,
                    why,
                }),
                Ok(()) => Ok(Evasion {
                    kind,
                    argument: Some(value),
                }),
            },
        },
        _ => Err(unknown()),
    })
}

impl Evasions {
    /// Parses `--evade` values (`none` adds nothing; a later value of a building block
    /// replaces an earlier one; a second evader is refused).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self, EvasionError> {
        let mut chosen = Self::default();
        for value in values {
            if value == "none" {
                continue;
            }
            if let Some(evasion) = block(value) {
                let evasion = evasion?;
                chosen.named.retain(|n| n.split(':').next() != Some(evasion.kind.name));
                chosen.named.push(evasion.name());
                chosen.add(evasion);
                continue;
            }
            let evader = match Evader::find(value) {
                Some(found) => found?,
                None => {
                    return Err(EvasionError::Unknown {
                        given: value.to_owned(),
                        expected: known_spellings(),
                    })
                }
            };
            if let Some(first) = &chosen.evader {
                return Err(EvasionError::TwoEvaders {
                    first: first.name.clone(),
                    second: evader.name,
                });
            }
            let file = &evader.file;
            let implied = [
                (file.counter == CounterAct::Paused).then_some((&super::pause_counter::KIND, None)),
                (file.counter == CounterAct::SharedOffset).then_some((&super::shared_offset::KIND, None)),
                file.tsc_khz.map(|khz| (&super::tsc_khz::KIND, Some(khz))),
            ];
            for (kind, argument) in implied.into_iter().flatten() {
                if let Some(Err(why)) = argument.map(kind.check) {
                    return Err(super::evader::EvaderError::Field {
                        name: evader.name,
                        field: "tsc_khz",
                        why: why.into(),
                    }
                    .into());
                }
                chosen.add(Evasion { kind, argument });
            }
            chosen.evader = Some(evader);
        }
        let position = |name: &str| EVASIONS.iter().position(|k| Some(k.name) == name.split(':').next());
        chosen.named.sort_by_key(|n| position(n));
        Ok(chosen)
    }

    fn add(&mut self, evasion: Evasion) {
        self.blocks.retain(|e| e.kind.name != evasion.kind.name);
        self.blocks.push(evasion);
        self.blocks
            .sort_by_key(|e| EVASIONS.iter().position(|k| k.name == e.kind.name));
    }

    pub fn is_none(&self) -> bool {
        self.blocks.is_empty() && self.evader.is_none()
    }

    /// Whether the building block `name` is among them (given or asked for by the evader).
    pub fn has(&self, name: &str) -> bool {
        self.blocks.iter().any(|e| e.kind.name == name)
    }

    /// The evader, where one was given.
    pub fn evader(&self) -> Option<&Evader> {
        self.evader.as_ref()
    }

    /// The names reports give them, joined with `+`; `none` where there are none.
    pub fn name(&self) -> String {
        let names: Vec<&str> = self
            .named
            .iter()
            .map(String::as_str)
            .chain(self.evader.as_ref().map(|e| e.name.as_str()))
            .collect();
        if names.is_empty() {
            return "none".into();
        }
        names.join("+")
    }

    /// What each of them needs, by name.
    fn needs(&self) -> Vec<(String, Needs)> {
        let mut all: Vec<(String, Needs)> = self
            .blocks
            .iter()
            .map(|e| (e.kind.name.to_owned(), e.kind.needs))
            .collect();
        if let Some(evader) = &self.evader {
            let clock = evader.clock();
            all.push((
                evader.name.clone(),
                Needs {
                    vmm_exits: clock.is_some_and(|c| c.needs_cpuid_exits()),
                    tsc_trap: evader.traps().any_instruction(),
                    msr: !evader.traps().msr.is_empty(),
                    moves_offset: clock.is_some_and(|c| c.moves_offset()),
                    guest: evader.cpuid() != CpuidAnswers::KVM,
                    ..Needs::NONE
                },
            ));
        }
        all
    }

    /// Refuses what a run of this shape cannot do: `vm` (not a native run), `counter`
    /// (two vCPUs), whether the VMM sees CPUID exits on the path, whether the run moves the
    /// TSC, whether this KVM can scale the TSC (`Err`: its flavour).
    pub fn check(
        &self,
        vm: bool,
        counter: bool,
        vmm_handles_cpuid: bool,
        moves_tsc: bool,
        tsc_control: Result<(), &'static str>,
    ) -> Result<(), EvasionError> {
        for (name, needs) in self.needs() {
            if needs.counter && !counter {
                return Err(EvasionError::NeedsCounter(name));
            }
            if (needs.tsc_trap || needs.moves_offset || needs.guest) && !vm {
                return Err(EvasionError::NeedsGuest(name));
            }
            if needs.vmm_exits && !vmm_handles_cpuid {
                return Err(EvasionError::NeedsVmmExits(name));
            }
            if needs.tsc_moves && !moves_tsc {
                return Err(EvasionError::NothingToShare(name));
            }
            if (needs.tsc_trap || needs.moves_offset) && moves_tsc {
                return Err(EvasionError::ClockAndOffset(name));
            }
            if needs.tsc_control {
                tsc_control.map_err(|flavour| EvasionError::NoTscControl { name, flavour })?;
            }
        }
        Ok(())
    }

    /// Whether every one of them acts on a path: one that traps the guest's TSC reads on
    /// any VM path (`vm`), one that acts on CPUID exits where the VMM handles CPUID.
    pub fn act_on(&self, vm: bool, vmm_handles_cpuid: bool) -> bool {
        self.needs().iter().all(|(_, needs)| {
            let cpuid = needs.vmm_exits || (!needs.tsc_trap && !needs.moves_offset && !needs.guest);
            vm && (!cpuid || vmm_handles_cpuid)
        })
    }

    /// Which TSC reads are trapped, where the evader traps any.
    pub fn traps(&self) -> Option<&Traps> {
        self.evader
            .as_ref()
            .map(Evader::traps)
            .filter(|traps| traps.any_instruction() || !traps.msr.is_empty())
    }

    /// Whether one of them traps the guest's RDTSC or RDTSCP.
    pub fn traps_tsc(&self) -> bool {
        self.traps().is_some_and(Traps::any_instruction)
    }

    /// The MSRs whose reads the evader intercepts (IA32_TSC, APERF, MPERF, TSC_AUX).
    pub fn trapped_msrs(&self) -> Vec<u32> {
        self.traps().map(Traps::msr_indices).unwrap_or_default()
    }

    /// What the guest's CPUID says where an evader changes it: KVM's answers without one.
    pub fn cpuid(&self) -> CpuidAnswers {
        self.evader.as_ref().map_or(CpuidAnswers::KVM, Evader::cpuid)
    }

    /// Whether the evader moves vCPU 0's TSC offset (a KVM must honour that).
    pub fn moves_offset(&self) -> bool {
        self.evader
            .as_ref()
            .and_then(Evader::clock)
            .is_some_and(|c| c.moves_offset())
    }

    /// The refusal of an evader that moves the TSC offset on a KVM that ignores it,
    /// naming the zoo's same clock through the RDTSC trap where there is one.
    pub fn offset_ignored(&self, flavour: &'static str) -> EvasionError {
        let name = self.evader.as_ref().map_or_else(String::new, |e| e.name.clone());
        let base = name.split(':').next().unwrap_or_default();
        let twin = format!("{base}-trapped");
        let trapped = if super::evader::zoo_text(&twin).is_some() {
            format!(", or use {twin}, the same clock through the RDTSC trap")
        } else {
            String::new()
        };
        EvasionError::OffsetIgnored { name, flavour, trapped }
    }

    /// The policies they become: the building blocks in registry order, then the
    /// evader's clock.
    pub fn policies(&self) -> Vec<Box<dyn ExitPolicy>> {
        self.blocks
            .iter()
            .map(|e| (e.kind.build)(e.argument))
            .chain(self.evader.as_ref().and_then(Evader::clock_policy))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_evasion_and_refuses_unknown_ones_and_absurd_rates() {
        let e = Evasions::parse(["tsc-khz:1000000", "pause-counter"]).unwrap();
        assert!(e.has("pause-counter") && !e.has("shared-offset"));
        assert_eq!(e.name(), "pause-counter+tsc-khz:1000000", "registry order");
        assert_eq!(e.policies().len(), 2);
        assert_eq!(Evasions::parse(["none"]).unwrap().name(), "none");
        let unknown = Evasions::parse(["teleport"]).unwrap_err();
        assert!(matches!(&unknown, EvasionError::Unknown { given, .. } if given == "teleport"));
        for spelling in [
            "pause-counter, shared-offset, tsc-khz:N",
            "bettertiming",
            "rdtsc-kvm-handler[:N]",
            "ophion[:N]",
            "or an evader file",
        ] {
            assert!(unknown.to_string().contains(spelling), "{spelling}: {unknown}");
        }
        let slow = Evasions::parse(["tsc-khz:5"]).unwrap_err();
        assert!(matches!(slow, EvasionError::Argument { value: 5, .. }));
        assert!(slow.to_string().contains("between 100,000 and 10,000,000"), "{slow}");
        for bad in [
            "tsc-khz:",
            "tsc-khz",
            "pause-counter:3",
            "tsc-khz:99999999999999999999999",
        ] {
            assert!(
                matches!(Evasions::parse([bad]), Err(EvasionError::Unknown { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_evader_brings_its_clock_its_traps_and_the_blocks_it_asks_for() {
        let e = Evasions::parse(["pause-counter", "rdtsc-kvm-handler:16"]).unwrap();
        assert_eq!(e.name(), "pause-counter+rdtsc-kvm-handler:16");
        assert!(e.traps_tsc() && e.trapped_msrs().is_empty() && !e.moves_offset());
        assert_eq!(Evasions::parse(["bettertiming"]).unwrap().trapped_msrs(), vec![0x10]);
        assert_eq!(e.policies().len(), 2);
        let two = Evasions::parse(["bettertiming", "ophion"]).unwrap_err();
        assert!(matches!(two, EvasionError::TwoEvaders { .. }), "{two}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paused.json");
        std::fs::write(
            &path,
            r#"{"description":"x","counter":"paused","traps":{"rdtsc":"every"},"clock":{"kind":"truth"}}"#,
        )
        .unwrap();
        let file = Evasions::parse([path.to_str().unwrap()]).unwrap();
        assert_eq!(file.name(), "paused", "named by the file, not by what it asks for");
        assert!(file.has("pause-counter"));
        let broken = Evasions::parse(["rdtsc-shield:0"]).unwrap_err();
        assert!(broken.to_string().contains("clock.divider"), "{broken}");
        assert!(Evasions::parse(["kvm-rdtsc-hack"]).unwrap().moves_offset());
        let slow = dir.path().join("slow.json");
        std::fs::write(&slow, r#"{"description":"x","tsc_khz":5}"#).unwrap();
        let khz = Evasions::parse([slow.to_str().unwrap()]).unwrap_err();
        assert!(
            khz.to_string().contains("slow: tsc_khz: the rate must be between"),
            "{khz}"
        );
    }

    #[test]
    fn the_help_names_every_evasion_and_every_zoo_member() {
        let help = help();
        for kind in EVASIONS {
            assert!(help.contains(kind.name) && help.contains(kind.does), "{}", kind.name);
        }
        for name in crate::shaping::evader::zoo_names() {
            assert!(help.contains(name), "{name}");
        }
    }

    #[test]
    fn each_evasion_is_refused_where_it_cannot_act() {
        let pause = Evasions::parse(["pause-counter"]).unwrap();
        assert_eq!(
            pause.check(true, false, true, false, Ok(())),
            Err(EvasionError::NeedsCounter("pause-counter".into()))
        );
        assert_eq!(
            pause.check(true, true, false, false, Ok(())),
            Err(EvasionError::NeedsVmmExits("pause-counter".into()))
        );
        assert_eq!(pause.check(true, true, true, false, Ok(())), Ok(()));
        let shared = Evasions::parse(["shared-offset"]).unwrap();
        assert_eq!(
            shared.check(true, true, true, false, Ok(())),
            Err(EvasionError::NothingToShare("shared-offset".into()))
        );
        assert_eq!(shared.check(true, true, true, true, Ok(())), Ok(()));
        let scale = Evasions::parse(["tsc-khz:1000000"]).unwrap();
        assert_eq!(
            scale.check(true, false, false, false, Err("kvm_pvm")),
            Err(EvasionError::NoTscControl {
                name: "tsc-khz".into(),
                flavour: "kvm_pvm"
            })
        );
        assert_eq!(scale.check(true, false, false, false, Ok(())), Ok(()));
        let clock = Evasions::parse(["hide-exits"]).unwrap();
        assert!(clock.traps_tsc() && !scale.traps_tsc());
        assert!(
            clock.act_on(true, false) && !clock.act_on(false, false),
            "hw-assist yes, native no"
        );
        assert!(!pause.act_on(true, false) && pause.act_on(true, true));
        assert_eq!(
            clock.check(false, false, false, false, Err("native: no KVM")),
            Err(EvasionError::NeedsGuest("hide-exits".into()))
        );
        assert_eq!(
            clock.check(true, false, false, false, Err("kvm_pvm")),
            Ok(()),
            "any VM path, any KVM"
        );
        assert_eq!(
            clock.check(true, false, true, true, Ok(())),
            Err(EvasionError::ClockAndOffset("hide-exits".into()))
        );
        // Ophion arms after a CPUID exit: it needs the VMM to see them.
        let armed = Evasions::parse(["ophion"]).unwrap();
        assert_eq!(
            armed.check(true, false, false, false, Ok(())),
            Err(EvasionError::NeedsVmmExits("ophion".into()))
        );
        assert!(!armed.act_on(true, false) && armed.act_on(true, true));
        let offset = Evasions::parse(["jonomango-hv"]).unwrap();
        assert_eq!(
            offset.check(true, false, true, true, Ok(())),
            Err(EvasionError::ClockAndOffset("jonomango-hv".into()))
        );
        assert_eq!(
            offset.check(false, false, false, false, Ok(())),
            Err(EvasionError::NeedsGuest("jonomango-hv".into()))
        );
    }
}
